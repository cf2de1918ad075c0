// momentum_cpu.cpp — the C++ CPU kernel.
//
// Inputs    : spans of (param, buf, grad) with equal dtype T and numel, contiguous, not overlapping
//             (checked by the torch-facing file, csrc/momentum_ops.cpp, before any call here).
// Invariant : every element goes through sgd_math() (sgd_math.h) exactly once, in opmath, with the
//             flags as a compile-time constant so the loop body is straight-line and vectorizes.
// Speed     : one pass reading p, buf, g and writing p, buf; all spans share one parallel region.
//             The AVX2 clone is compiled with target("avx2,fma,f16c") and picked at run time, so
//             the library still runs on CPUs without AVX2. Bitwise equality with torch needs a real
//             fma instruction and no contraction of a*b+c (-ffp-contract=off): docs/numerics.md.
// bf16 ops  : master-weights spans (bf16_split.h: master_elem over blocks of elements, the tie
//             bits unpacked to bytes), stochastic-rounding spans (stochastic.h: sr_elem over
//             blocks of elements) and narrow-momentum spans (momentum_dtype.h: bf16mom_elem over
//             elements; q8_elem over an int8 block, then its absmax, scale and codes) and fp16
//             master spans (fp16_master.h: fp16_master_elem over elements), fp32 arithmetic;
//             the loops vectorize.
#include "momentum_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "momentum_cuda/bf16_split.h"
#include "momentum_cuda/fp16_master.h"
#include "momentum_cuda/momentum_dtype.h"
#include "momentum_cuda/stochastic.h"
#include "momentum_cuda/sgd_math.h"

namespace momentum_cuda {
namespace {

/// Storage type T <-> opmath (sgd_math.h's StorageSame for fp32/fp64; bf16/fp16 below).
template <class T>
struct Storage : StorageSame<T> {};
template <>
struct Storage<c10::BFloat16> {
  using opmath = float;
  using Round = RoundBF16;
  static MC_HD float load(c10::BFloat16 x) { return mc_bf16_bits_to_float(x.x); }
  static MC_HD c10::BFloat16 store(float x) {
    return c10::BFloat16(mc_float_to_bf16_bits(x), c10::BFloat16::from_bits());
  }
};
struct RoundHalf {
  MC_HD float operator()(float x) const { return mc_fp16_bits_to_float(mc_float_to_fp16_bits(x)); }
};
template <>
struct Storage<c10::Half> {
  using opmath = float;
  using Round = RoundHalf;
  static MC_HD float load(c10::Half x) { return mc_fp16_bits_to_float(x.x); }
  static MC_HD c10::Half store(float x) {
    return c10::Half(mc_float_to_fp16_bits(x), c10::Half::from_bits());
  }
};

template <class T>
constexpr bool kNarrow = !std::is_same_v<T, float> && !std::is_same_v<T, double>;

template <class T>
using Scalars = StepScalars<typename Storage<T>::opmath>;

template <class T, uint32_t F, class Add>
MC_HD void span_loop(const Span& sp, int64_t begin, int64_t end, const Scalars<T>& s) {
  using St = Storage<T>;
  using O = typename St::opmath;
  T* __restrict p = static_cast<T*>(sp.param);
  T* __restrict b = static_cast<T*>(sp.buf);
  const T* __restrict g = static_cast<const T*>(sp.grad);
  for (int64_t i = begin; i < end; ++i) {
    O pi = St::load(p[i]);
    O bi = ((F & kMomentum) && !(F & kFirstStep)) ? St::load(b[i]) : O(0);
    sgd_math(pi, bi, St::load(g[i]), s, F, typename St::Round{}, Add{});
    p[i] = St::store(pi);
    if (F & kMomentum) b[i] = St::store(bi);
  }
}

template <class T, uint32_t F, class Add>
__attribute__((target("avx2,fma,f16c"))) void span_loop_avx2(const Span& sp, int64_t begin,
                                                              int64_t end, const Scalars<T>& s) {
  span_loop<T, F, Add>(sp, begin, end, s);
}

template <class T, uint32_t F, class Add>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) void span_loop_avx512(
    const Span& sp, int64_t begin, int64_t end, const Scalars<T>& s) {
  span_loop<T, F, Add>(sp, begin, end, s);
}

template <class T, uint32_t F, class Add>
void span_loop_default(const Span& sp, int64_t begin, int64_t end, const Scalars<T>& s) {
  span_loop<T, F, Add>(sp, begin, end, s);
}

template <class T>
using LoopFn = void (*)(const Span&, int64_t, int64_t, const Scalars<T>&);

/// Maps the run-time flag set to the loop compiled for it (invalid sets were rejected before).
template <class T, class Add, uint32_t F = 0>
LoopFn<T> pick_loop(uint32_t flags, CpuIsa isa) {
  if constexpr (F > kAllFlags) {
    return nullptr;
  } else {
    if constexpr (flags_valid(F)) {
      if (flags == F) {
        if constexpr (kNarrow<T>) {
          if (isa == CpuIsa::kAvx512) return &span_loop_avx512<T, F, Add>;
        }
        return isa != CpuIsa::kDefault ? &span_loop_avx2<T, F, Add> : &span_loop_default<T, F, Add>;
      }
    }
    return pick_loop<T, Add, F + 1>(flags, isa);
  }
}

// The bf16 loops run over blocks of kBlock elements (kBlockBytes tie bytes): element-wise loops
// of master_elem / sr_elem with the flags a compile-time constant and a constant trip count,
// which GCC vectorizes. The loops over master_math / sr_math, 8 elements a call with the tie
// bits in a register, stayed scalar: 10M elements on one core of the shared 2-core AMD EPYC
// (AVX2 clone, momentum only) took 63 ms (master) and 17 ms (SR) against 6 ms for the fp32
// op; the blocks take about 6.5 and 5 ms.
constexpr int kBlockBytes = 32;
constexpr int kBlock = 8 * kBlockBytes;
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "tie bytes are unpacked as uint64 words");

/// A tie byte's 8 bits as 8 bytes of 0 or 1, bit j in byte j (memory order, little-endian):
/// byte j of t * 0x0101..01 masked with 1 << j is 0 or 1 << j, and + 0x7F carries into its top
/// bit exactly when it is not 0 (and never into the next byte).
MC_HD uint64_t unpack_tie_byte(uint8_t t) {
  const uint64_t v = (uint64_t(t) * 0x0101010101010101ull) & 0x8040201008040201ull;
  return ((v + 0x7f7f7f7f7f7f7f7full) >> 7) & 0x0101010101010101ull;
}
/// unpack_tie_byte's inverse on 8 bytes of 0 or 1: the multiply moves byte j's bit to bit 56 + j,
/// with no carries (every other product bit lands below 56, each in its own place).
MC_HD uint8_t pack_tie_byte(uint64_t v) {
  return static_cast<uint8_t>((v * 0x0102040810204080ull) >> 56);
}

/// n <= kBlock elements of a master span from a tie byte (p, b, g, r at that element, ties at
/// its byte; b null without kMomentum): the tie bits unpacked to bytes, master_elem on each
/// element, the bits packed back (those past n 0, as master_math leaves them).
template <uint32_t F, class Add>
MC_HD void master_block(uint16_t* __restrict p, float* __restrict b, const uint16_t* __restrict g,
                        uint16_t* __restrict r, uint8_t* __restrict ties, int n,
                        const StepScalars<float>& s) {
  alignas(32) uint8_t t[kBlock];
  const int nb = (n + 7) / 8;
  for (int k = 0; k < nb; ++k) {
    const uint64_t v = unpack_tie_byte(ties[k]);
    std::memcpy(t + 8 * k, &v, 8);
  }
  for (int j = 0; j < n; ++j) {
    t[j] = static_cast<uint8_t>(master_elem<Add>(p, b, g, r, j, t[j], s, F));
  }
  for (int j = n; j < 8 * nb; ++j) t[j] = 0;
  for (int k = 0; k < nb; ++k) {
    uint64_t v;
    std::memcpy(&v, t + 8 * k, 8);
    ties[k] = pack_tie_byte(v);
  }
}

/// Master-weights spans: groups [k0, k1) of 8 elements (a tie byte each), fp32 arithmetic.
template <uint32_t F, class Add>
MC_HD void master_loop(const MasterSpan& sp, int64_t k0, int64_t k1, const StepScalars<float>& s) {
  for (int64_t k = k0; k < k1; k += kBlockBytes) {
    const int64_t i0 = 8 * k;
    const int64_t groups = std::min<int64_t>(kBlockBytes, k1 - k);
    const int n = static_cast<int>(std::min(8 * groups, sp.numel - i0));
    float* b = (F & kMomentum) ? sp.buf + i0 : nullptr;
    if (n == kBlock) {  // the constant trip count: no vector epilogue
      master_block<F, Add>(sp.param + i0, b, sp.grad + i0, sp.rem + i0, sp.ties + k, kBlock, s);
    } else {
      master_block<F, Add>(sp.param + i0, b, sp.grad + i0, sp.rem + i0, sp.ties + k, n, s);
    }
  }
}

/// n <= kBlock elements of a stochastic-rounding span whose random bits are those of indices
/// i .. i + n - 1 (p, b, g at the first; b null without kMomentum): sr_elem on each, the first
/// half of mc_sr_random hoisted out of the loop unless the low 32 bits of the index wrap inside
/// the block (a shard's offset may put the wrap anywhere).
template <uint32_t F, class Add>
MC_HD void sr_block(uint16_t* __restrict p, uint16_t* __restrict b, const uint16_t* __restrict g,
                    int64_t i, int n, uint32_t key, const StepScalars<float>& s) {
  const uint32_t lo = static_cast<uint32_t>(static_cast<uint64_t>(i));
  if (lo + static_cast<uint32_t>(n - 1) < lo) {
    for (int j = 0; j < n; ++j) sr_elem<Add>(p, b, g, j, mc_sr_random(key, i + j), s, F);
    return;
  }
  const uint32_t hi = mc_sr_key_hi(key, i);
  for (int j = 0; j < n; ++j) {
    sr_elem<Add>(p, b, g, j, mc_sr_random_lo(hi, lo + static_cast<uint32_t>(j)), s, F);
  }
}

/// Stochastic-rounding spans: elements [i0, i1), fp32 arithmetic.
template <uint32_t F, class Add>
MC_HD void sr_loop(const SrSpan& sp, int64_t i0, int64_t i1, const StepScalars<float>& s) {
  for (int64_t i = i0; i < i1; i += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, i1 - i));
    uint16_t* b = (F & kMomentum) ? sp.buf + i : nullptr;
    if (n == kBlock) {
      sr_block<F, Add>(sp.param + i, b, sp.grad + i, sp.offset + i, kBlock, sp.key, s);
    } else {
      sr_block<F, Add>(sp.param + i, b, sp.grad + i, sp.offset + i, n, sp.key, s);
    }
  }
}

/// bf16-momentum spans: elements [i0, i1).
template <uint32_t F, class Add>
MC_HD void bf16mom_loop(const Bf16MomSpan& sp, int64_t i0, int64_t i1, const StepScalars<float>& s) {
  for (int64_t i = i0; i < i1; i += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, i1 - i));
    float* __restrict p = sp.param + i;
    uint16_t* __restrict b = (F & kMomentum) ? sp.buf + i : nullptr;
    const float* __restrict g = sp.grad + i;
    for (int j = 0; j < n; ++j) bf16mom_elem<Add>(p, b, g, j, s, F);
  }
}

/// n <= kQBlock elements of one int8 block (p, q, g at its first element): q8_elem on each into
/// v, then (with kMomentum) the block's absmax, its new scale and the codes.
template <uint32_t F, class Add>
MC_HD void q8_block(float* __restrict p, int8_t* __restrict q, float* __restrict scale,
                    const float* __restrict g, int n, const StepScalars<float>& s) {
  alignas(64) float v[kQBlock];
  const float sc = ((F & kMomentum) && !(F & kFirstStep)) ? *scale : 0.f;
  for (int j = 0; j < n; ++j) v[j] = q8_elem<Add>(p, q, sc, g, j, s, F);
  if (!(F & kMomentum)) return;
  uint32_t a = 0;
  for (int j = 0; j < n; ++j) a = std::max(a, q8_abs_bits(v[j]));
  const float ns = q8_scale(a);
  // q8_code with its test on the scale taken out of the loop, which then vectorizes
  if (ns > 0.f) {
    for (int j = 0; j < n; ++j) q[j] = q8_round(mc_div(v[j], ns));
  } else {
    for (int j = 0; j < n; ++j) q[j] = 0;
  }
  *scale = ns;
}

/// int8-momentum spans: blocks [k0, k1) of kQBlock elements.
template <uint32_t F, class Add>
MC_HD void q8_loop(const Q8Span& sp, int64_t k0, int64_t k1, const StepScalars<float>& s) {
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t i = k * kQBlock;
    const int n = static_cast<int>(std::min<int64_t>(kQBlock, sp.numel - i));
    int8_t* q = (F & kMomentum) ? sp.codes + i : nullptr;
    float* sc = (F & kMomentum) ? sp.scales + k : nullptr;
    if (n == kQBlock) {
      q8_block<F, Add>(sp.param + i, q, sc, sp.grad + i, kQBlock, s);
    } else {
      q8_block<F, Add>(sp.param + i, q, sc, sp.grad + i, n, s);
    }
  }
}

/// fp16 master spans: elements [i0, i1).
template <uint32_t F, class Add>
MC_HD void fp16_master_loop(const Fp16MasterSpan& sp, int64_t i0, int64_t i1,
                            const StepScalars<float>& s) {
  for (int64_t i = i0; i < i1; i += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, i1 - i));
    uint16_t* __restrict p = sp.param + i;
    float* __restrict m = sp.master + i;
    float* __restrict b = (F & kMomentum) ? sp.buf + i : nullptr;
    const uint16_t* __restrict g = sp.grad + i;
    for (int j = 0; j < n; ++j) fp16_master_elem<Add>(p, m, b, g, j, s, F);
  }
}

/// The loop of a bf16 span type S: master_loop over tie bytes, q8_loop over int8 blocks,
/// sr_loop, bf16mom_loop and fp16_master_loop over elements.
template <class S, uint32_t F, class Add>
MC_HD void bf16_loop(const S& sp, int64_t lo, int64_t hi, const StepScalars<float>& s) {
  if constexpr (std::is_same_v<S, MasterSpan>) {
    master_loop<F, Add>(sp, lo, hi, s);
  } else if constexpr (std::is_same_v<S, Q8Span>) {
    q8_loop<F, Add>(sp, lo, hi, s);
  } else if constexpr (std::is_same_v<S, Bf16MomSpan>) {
    bf16mom_loop<F, Add>(sp, lo, hi, s);
  } else if constexpr (std::is_same_v<S, Fp16MasterSpan>) {
    fp16_master_loop<F, Add>(sp, lo, hi, s);
  } else {
    sr_loop<F, Add>(sp, lo, hi, s);
  }
}

template <class S, uint32_t F, class Add>
__attribute__((target("avx2,fma,f16c"))) void bf16_loop_avx2(const S& sp, int64_t lo, int64_t hi,
                                                              const StepScalars<float>& s) {
  bf16_loop<S, F, Add>(sp, lo, hi, s);
}

template <class S, uint32_t F, class Add>
void bf16_loop_default(const S& sp, int64_t lo, int64_t hi, const StepScalars<float>& s) {
  bf16_loop<S, F, Add>(sp, lo, hi, s);
}

template <class S>
using Bf16Fn = void (*)(const S&, int64_t, int64_t, const StepScalars<float>&);

/// pick_loop for master and stochastic-rounding spans (fp32 arithmetic: the AVX2 clone, as
/// fp32 uses).
template <class S, class Add, uint32_t F = 0>
Bf16Fn<S> pick_bf16_loop(uint32_t flags, CpuIsa isa) {
  if constexpr (F > kAllFlags) {
    return nullptr;
  } else {
    if constexpr (flags_valid(F)) {
      if (flags == F) {
        return isa != CpuIsa::kDefault ? &bf16_loop_avx2<S, F, Add> : &bf16_loop_default<S, F, Add>;
      }
    }
    return pick_bf16_loop<S, Add, F + 1>(flags, isa);
  }
}

bool cpu_has_avx2() {
  __builtin_cpu_init();  // needed when called during static initialization (GCC manual)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return has;
}

constexpr int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Our own split of the work: below 32768 elements one thread is faster (ATen's grain size).
constexpr int64_t kGrainSize = 32768;

// torch's for-loop SGD on a bf16/fp16 tensor of n elements (torch 2.13, measured on AVX2,
// AVX-512 and DEFAULT capabilities; tests/test_torch_numerics.py pins it): TensorIterator runs
// at::parallel_for(0, n, 32768) (one chunk if n <= 32768 or one thread, else
// min(threads, ceil(n/32768)) chunks of ceil(n/chunks)); inside a chunk, blocks of 32 elements
// go through the vectorized add (alpha narrowed to bf16/fp16, one fp32 rounding), and the last
// (chunk length % 32) elements through c10's scalar arithmetic, which narrows the product first.
// With ATEN_CPU_CAPABILITY=default (a CPU without AVX2), torch's kernels are built without FMA:
// add(x, y, alpha=a) is round(x + round(a*y)) for every element and dtype (measured, torch 2.13;
// tests/test_torch_numerics.py).
constexpr int64_t kTorchGrain = 32768;
constexpr int64_t kTorchVecBlock = 32;

/// Whether torch's CPU kernels run with FMA (capability AVX2, AVX512, ...) or without (DEFAULT).
bool torch_uses_fma() {
  static const bool fma = at::get_cpu_capability() != "DEFAULT";
  return fma;
}

/// Runs run(span index, lo, hi) over the units of every span (start: prefix sums of each
/// span's units), all spans in one parallel region split evenly over the concatenated range, so
/// 2000 small tensors cost one region as one large one does.
template <class Run>
void parallel_over_spans(const std::vector<int64_t>& start, int64_t grain, const Run& run) {
  const int64_t n_spans = static_cast<int64_t>(start.size()) - 1;
  if (n_spans <= 0 || start[n_spans] == 0) return;
  at::parallel_for(0, start[n_spans], grain, [&](int64_t begin, int64_t end) {
    int64_t k = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (; k < n_spans && start[k] < end; ++k) {
      const int64_t lo = std::max(begin, start[k]) - start[k];
      const int64_t hi = std::min(end, start[k + 1]) - start[k];
      if (hi > lo) run(k, lo, hi);
    }
  });
}

std::atomic<CpuIsa> g_isa{cpu_has_avx512() ? CpuIsa::kAvx512
                          : cpu_has_avx2() ? CpuIsa::kAvx2
                                           : CpuIsa::kDefault};

}  // namespace

CpuIsa cpu_isa() { return g_isa.load(); }
bool cpu_isa_available(CpuIsa isa) {
  return isa == CpuIsa::kDefault || (isa == CpuIsa::kAvx2 ? cpu_has_avx2() : cpu_has_avx512());
}
void set_cpu_isa(CpuIsa isa) { g_isa.store(isa); }

template <class T>
void sgd_step_cpu(const Span* spans, int64_t n_spans, const StepHyper& h) {
  using O = typename Storage<T>::opmath;
  const CpuIsa isa = cpu_isa();
  const LoopFn<T> narrowed = pick_loop<T, AddNarrowedProduct>(h.flags, isa);
  const LoopFn<T> body = torch_uses_fma() ? pick_loop<T, AddFma>(h.flags, isa) : narrowed;
  const LoopFn<T> tail = kNarrow<T> ? narrowed : body;
  if (body == nullptr || tail == nullptr || n_spans <= 0) return;
  const auto alpha = [](double v) -> O {  // bf16/fp16: torch narrows an add's alpha first
    return static_cast<O>(kNarrow<T> ? static_cast<float>(T(static_cast<float>(v))) : v);
  };
  const Scalars<T> s = make_scalars<O>(h.lr, h.momentum, h.dampening, h.weight_decay, alpha);
  // Inside a parallel region torch's own ops run serially: one chunk.
  const int64_t torch_threads = at::in_parallel_region() ? 1 : at::get_num_threads();

  // Runs elements [lo, hi) of span sp, each through the arithmetic torch uses at its position.
  const auto run = [&](const Span& sp, int64_t lo, int64_t hi) {
    if (!kNarrow<T>) return body(sp, lo, hi, s);
    const int64_t n = sp.numel;
    const int64_t chunks =
        (n <= kTorchGrain || torch_threads <= 1) ? 1 : std::min(torch_threads, divup(n, kTorchGrain));
    const int64_t cs = divup(n, chunks);
    for (int64_t c0 = (lo / cs) * cs; c0 < hi; c0 += cs) {
      const int64_t c1 = std::min(n, c0 + cs);
      const int64_t t0 = c1 - (c1 - c0) % kTorchVecBlock;
      if (std::max(lo, c0) < std::min(hi, t0)) body(sp, std::max(lo, c0), std::min(hi, t0), s);
      if (std::max(lo, t0) < std::min(hi, c1)) tail(sp, std::max(lo, t0), std::min(hi, c1), s);
    }
  };

  std::vector<int64_t> start(n_spans + 1, 0);
  for (int64_t k = 0; k < n_spans; ++k) start[k + 1] = start[k] + spans[k].numel;
  parallel_over_spans(start, kGrainSize,
                      [&](int64_t k, int64_t lo, int64_t hi) { run(spans[k], lo, hi); });
}

/// The bf16 ops' step: S's loop over units (unit(span) per span: tie bytes or elements), in
/// parallel; the master's arithmetic is torch's fp32 step: alphas rounded once to fp32, fma
/// where torch's kernels have it (sgd_step_cpu's choice for fp32), at every position.
template <class S, class Units>
void bf16_step_cpu(const S* spans, int64_t n_spans, const StepHyper& h, int64_t grain,
                   Units&& units) {
  const Bf16Fn<S> body = torch_uses_fma() ? pick_bf16_loop<S, AddFma>(h.flags, cpu_isa())
                                          : pick_bf16_loop<S, AddNarrowedProduct>(h.flags, cpu_isa());
  if (body == nullptr || n_spans <= 0) return;
  const auto alpha = [](double v) { return static_cast<float>(v); };
  const StepScalars<float> s =
      make_scalars<float>(h.lr, h.momentum, h.dampening, h.weight_decay, alpha);
  std::vector<int64_t> start(n_spans + 1, 0);
  for (int64_t k = 0; k < n_spans; ++k) start[k + 1] = start[k] + units(spans[k]);
  parallel_over_spans(start, grain,
                      [&](int64_t k, int64_t lo, int64_t hi) { body(spans[k], lo, hi, s); });
}

void sgd_step_master_cpu(const MasterSpan* spans, int64_t n_spans, const StepHyper& h) {
  // units of 8 elements, so no two threads write one tie byte
  bf16_step_cpu(spans, n_spans, h, kGrainSize / 8,
                [](const MasterSpan& sp) { return divup(sp.numel, 8); });
}

void sgd_step_sr_cpu(const SrSpan* spans, int64_t n_spans, const StepHyper& h) {
  bf16_step_cpu(spans, n_spans, h, kGrainSize, [](const SrSpan& sp) { return sp.numel; });
}

void sgd_step_bf16mom_cpu(const Bf16MomSpan* spans, int64_t n_spans, const StepHyper& h) {
  bf16_step_cpu(spans, n_spans, h, kGrainSize, [](const Bf16MomSpan& sp) { return sp.numel; });
}

void sgd_step_q8_cpu(const Q8Span* spans, int64_t n_spans, const StepHyper& h) {
  // units of kQBlock elements: a block's absmax is one thread's
  bf16_step_cpu(spans, n_spans, h, kGrainSize / kQBlock,
                [](const Q8Span& sp) { return divup(sp.numel, kQBlock); });
}

void sgd_step_fp16_master_cpu(const Fp16MasterSpan* spans, int64_t n_spans, const StepHyper& h) {
  bf16_step_cpu(spans, n_spans, h, kGrainSize, [](const Fp16MasterSpan& sp) { return sp.numel; });
}

template void sgd_step_cpu<float>(const Span*, int64_t, const StepHyper&);
template void sgd_step_cpu<double>(const Span*, int64_t, const StepHyper&);
template void sgd_step_cpu<c10::BFloat16>(const Span*, int64_t, const StepHyper&);
template void sgd_step_cpu<c10::Half>(const Span*, int64_t, const StepHyper&);

}  // namespace momentum_cuda
