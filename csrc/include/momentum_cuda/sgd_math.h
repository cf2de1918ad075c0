// sgd_math.h — the momentum update, written once for every C++ and CUDA path.
//
// Inputs : one element (or one SIMD pack) of the parameter p, momentum buffer buf and
//          gradient g, already widened to the opmath type (fp32 for fp32/bf16/fp16, fp64 for fp64);
//          StepScalars already rounded to the opmath type on the host.
// Output : p and buf updated in place (still in opmath; the caller narrows to storage).
// Contract: exactly the bits of torch.optim.SGD's for-loop path (_single_tensor_sgd), which runs
//          one ATen op per line below, each computing in opmath and rounding to the storage dtype:
//            g   = -g                                   (maximize)
//            g   = g.add(p, alpha=wd)        -> fma(p, wd, g)
//            buf = g.clone()                            (first step)
//            buf = buf.mul_(m).add_(g, 1-d)  -> fma(g, 1-d, buf*m)
//            g   = g.add(buf, alpha=m)       -> fma(buf, m, g)          (nesterov)
//            p   = p.add_(g, alpha=-lr)      -> fma(g, -lr, p)
//          add(x, y, alpha=a) is exactly fma(y, a, x) in torch on the CPU (pinned by
//          tests/test_torch_numerics.py; docs/numerics.md). The EMA form v = b*v + (1-b)*g is
//          this formula with d = b, v starting at zero and no first-step clone.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MC_HD __host__ __device__ __forceinline__
#else
#define MC_HD inline __attribute__((always_inline))
#endif

namespace momentum_cuda {

/// Bits of StepFlags select which of torch's optional ops run. They mirror torch's Python
/// conditions (`weight_decay != 0`, `momentum != 0`, buffer is None), tested on the doubles.
enum StepFlags : uint32_t {
  kMaximize = 1u << 0,     ///< g = -g
  kWeightDecay = 1u << 1,  ///< g = fma(p, wd, g)
  kMomentum = 1u << 2,     ///< buffer update; without it buf is neither read nor written
  kNesterov = 1u << 3,     ///< g = fma(buf, m, g); needs kMomentum
  kFirstStep = 1u << 4,    ///< buf = g (torch clones the gradient on step 1); needs kMomentum
};
constexpr uint32_t kAllFlags = 31u;

/// True for flag sets the formula accepts (nesterov / first step only with momentum).
constexpr bool flags_valid(uint32_t f) {
  return f <= kAllFlags && ((f & kMomentum) || !(f & (kNesterov | kFirstStep)));
}

/// Hyper-parameters after the host rounded each one once, as torch does with a Python double
/// scalar: float(1 - dampening) is NOT 1.0f - float(dampening). `momentum_mul` scales the buffer
/// (buf.mul_(m)); the others are `alpha`s of add ops, which torch's CPU kernels for bf16/fp16
/// round to the storage dtype first (measured, torch 2.13: see csrc/cpu/momentum_cpu.cpp).
template <class S>
struct StepScalars {
  S neg_lr;               ///< alpha of p.add_(g, alpha=-lr)
  S weight_decay;         ///< alpha of g.add(p, alpha=wd)
  S momentum_mul;         ///< factor of buf.mul_(m)
  S momentum_add;         ///< alpha of g.add(buf, alpha=m) (nesterov)
  S one_minus_dampening;  ///< alpha of buf.add_(g, alpha=1-d)
};

/// Rounds the user's doubles the way torch evaluates them; `alpha` narrows an add op's alpha
/// (a plain cast to S, or through the storage dtype on CPU for bf16/fp16). Host only: kernels
/// receive the rounded values.
template <class S, class AlphaCast>
inline StepScalars<S> make_scalars(double lr, double momentum, double dampening,
                                   double weight_decay, AlphaCast alpha) {
  return StepScalars<S>{alpha(-lr), alpha(weight_decay), static_cast<S>(momentum),
                        alpha(momentum), alpha(1.0 - dampening)};
}

// ---- scalar opmath operations (float, double) --------------------------------------------
// Every multiply-add is written as an explicit single-rounding fma, and every multiply as a
// correctly rounded multiply, so no compiler contraction can change the bits. On CUDA,
// MC_CUDA_ADD_IS_FMA=0 switches to mul-then-add, should a GPU show that torch's add_ with
// alpha does not contract (tools/gpu_rounding_probe.py tells, on a GPU; docs/numerics.md).
#ifndef MC_CUDA_ADD_IS_FMA
#define MC_CUDA_ADD_IS_FMA 1
#endif

MC_HD float mc_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
#if MC_CUDA_ADD_IS_FMA
  return __fmaf_rn(a, b, c);
#else
  return __fadd_rn(__fmul_rn(a, b), c);
#endif
#else
  return std::fma(a, b, c);
#endif
}
MC_HD double mc_fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
#if MC_CUDA_ADD_IS_FMA
  return __fma_rn(a, b, c);
#else
  return __dadd_rn(__dmul_rn(a, b), c);
#endif
#else
  return std::fma(a, b, c);
#endif
}
MC_HD float mc_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MC_HD float mc_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MC_HD double mc_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
MC_HD double mc_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

/// torch's add(x, y, alpha=a) in its vectorized kernels (and on CUDA): one rounding in opmath,
/// then narrowed by `round`.
struct AddFma {
  template <class V, class S, class Round>
  MC_HD V operator()(V x, V y, S a, Round round) const {
    return round(mc_fma(y, a, x));
  }
};
/// torch's add(x, y, alpha=a) in the scalar tail of its CPU kernels for bf16/fp16, where c10's
/// BFloat16/Half arithmetic narrows the product before the sum: round(x + round(a * y)).
struct AddNarrowedProduct {
  template <class V, class S, class Round>
  MC_HD V operator()(V x, V y, S a, Round round) const {
    return round(mc_add(x, round(mc_mul(y, a))));
  }
};

/// The update itself. V is the opmath value, S its scalar, `flags` a StepFlags set (a
/// compile-time constant on the CPU, so the branches fold away), Round narrows a V to storage
/// precision and widens it back (identity for fp32/64), Add is AddFma or AddNarrowedProduct.
template <class V, class S, class Round, class Add = AddFma>
MC_HD void sgd_math(V& p, V& buf, V g, const StepScalars<S>& s, uint32_t flags, Round round,
                    Add add = Add{}) {
  if (flags & kMaximize) g = -g;
  if (flags & kWeightDecay) g = add(g, p, s.weight_decay, round);
  if (flags & kMomentum) {
    if (flags & kFirstStep) {
      buf = g;
    } else {
      buf = add(round(mc_mul(buf, s.momentum_mul)), g, s.one_minus_dampening, round);
    }
    g = (flags & kNesterov) ? add(g, buf, s.momentum_add, round) : buf;
  }
  p = add(p, g, s.neg_lr, round);
}

/// torch.amp.GradScaler's unscale of one gradient element (torch's
/// _amp_foreach_non_finite_check_and_unscale_ with inv = float(1 / double(scale))): g * inv in
/// opmath, narrowed by `round` to the gradient's dtype. The caller skips it when inv == 1, as
/// torch returns g itself then.
template <class V, class Round>
MC_HD V amp_unscale(V g, float inv, Round round) {
  return round(mc_mul(g, static_cast<V>(inv)));
}

/// torch's g.mul_(coef) for the clip coefficient of clip_grad_norm_ (coef of g's dtype, widened
/// exactly to opmath): one rounding in opmath, narrowed by `round`.
template <class V, class Round>
MC_HD V clip_scale(V g, V coef, Round round) {
  return round(mc_mul(g, coef));
}

/// inv of GradScaler's unscale_ for a scale: the double reciprocal rounded once to fp32
/// (torch: scale.double().reciprocal().float()).
MC_HD float amp_inv_scale(float scale) { return static_cast<float>(1.0 / static_cast<double>(scale)); }

// ---- storage <-> opmath ------------------------------------------------------------------
MC_HD uint32_t mc_float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
MC_HD float mc_bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

/// fp32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0, as c10::BFloat16 does. Written
/// without a branch (a select) so that CPU loops over bf16 vectorize.
MC_HD uint16_t mc_float_to_bf16_bits(float f) {
  const uint32_t u = mc_float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}
MC_HD float mc_bf16_bits_to_float(uint16_t b) { return mc_bits_float(uint32_t(b) << 16); }

/// fp32 -> fp16 bits, round to nearest even (subnormals, overflow to inf; NaN -> 0x7E00 with the
/// sign), bit for bit c10's fp16_ieee_from_fp32_value (c10/util/Half.h, from Maratyszcza's FP16
/// library): the rounding is done by one fp32 addition, so it is branch-free and vectorizes.
/// (c10::Half(float) itself did not vectorize: fp16 steps ran at 0.05 G elements/s, 88x slower
/// than torch's own fp16 ops, measured with momentum-cuda bench on 2026-11-24.)
MC_HD uint16_t mc_float_to_fp16_bits(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const uint32_t w = mc_float_bits(f);
  float base = (mc_bits_float(w & 0x7fffffffu) * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;  // a max: vectorizes
  base = mc_add(mc_bits_float((bias >> 1) + 0x07800000u), base);
  const uint32_t bits = mc_float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
  // Selects as masks: GCC 12 leaves `c ? a : b` on these as control flow, and the loop scalar.
  const uint32_t nan = 0u - uint32_t(shl1_w > 0xff000000u);
  return static_cast<uint16_t>((sign >> 16) | (0x7e00u & nan) | (nonsign & ~nan));
}
/// fp16 bits -> fp32, exact; c10's fp16_ieee_to_fp32_value, branch-free.
MC_HD float mc_fp16_bits_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = mc_mul(mc_bits_float((two_w >> 4) + (0xe0u << 23)), 0x1.0p-112f);
  const float denormalized = mc_add(mc_bits_float((two_w >> 17) | (126u << 23)), -0.5f);
  const uint32_t sub = 0u - uint32_t(two_w < (1u << 27));
  return mc_bits_float(sign | (mc_float_bits(denormalized) & sub) |
                       (mc_float_bits(normalized) & ~sub));
}

/// Round to bf16 and widen again: what torch's storage in bf16 does between two ops.
struct RoundBF16 {
  MC_HD float operator()(float x) const { return mc_bf16_bits_to_float(mc_float_to_bf16_bits(x)); }
};
/// fp32 and fp64 storage: no rounding between ops beyond the op's own.
struct RoundNone {
  template <class V>
  MC_HD V operator()(V x) const { return x; }
};

/// Storage of fp32/fp64: opmath is the storage type itself. Each backend's Storage<T> (load
/// widens, store narrows, Round narrows and widens between ops) starts from this and adds its own
/// bf16/fp16 conversions (c10's on the CPU, CUDA's on the GPU).
template <class T>
struct StorageSame {
  using opmath = T;
  using Round = RoundNone;
  static MC_HD T load(T x) { return x; }
  static MC_HD T store(T x) { return x; }
};

}  // namespace momentum_cuda
