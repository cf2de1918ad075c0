// momentum_cpu.h — the CPU kernel's interface: plain pointers and scalars, no ATen types.
#pragma once

#include <cstdint>

namespace momentum_cuda {

/// One contiguous run of elements: param and buf are updated in place, grad is read.
/// buf may be null when the step has no kMomentum flag.
struct Span {
  void* param;
  void* buf;
  void* grad;  ///< written only by a CUDA step that unscales or clips (AmpPtrs)
  int64_t numel;
};

/// What the CUDA kernels do to a gradient before the update, read from device memory (null: not
/// given): torch.amp.GradScaler's tensors (grad_scale unscales, found_inf != 0 skips the update)
/// and a clip coefficient (optim.clip_grad_norm_'s, one element of the gradients' dtype T; the
/// unscaled gradient is multiplied by it, as torch's g.mul_(coef) after GradScaler.unscale_).
/// The gradient so computed is written back, also on a skipped step, as torch leaves it.
/// first_step (the op's first_step_tensor): whether the buffers were never stepped, decided on
/// the device (optim's _Unsure); the host set kFirstStep and the kernel clears it when false.
struct AmpPtrs {
  const float* grad_scale;
  const float* found_inf;
  const void* clip_coef;  ///< a const T*
  const bool* first_step;
};

/// A hyper-parameter in device memory (a 1-element fp32 or fp64 tensor, e.g. a scheduler's),
/// read by the CUDA kernels in place of StepHyper's double; at most one pointer is set.
struct ScalarPtr {
  const float* f32;
  const double* f64;
};

/// The hyper-parameters held in device memory (HyperPtrs' null members: the double is used).
struct HyperPtrs {
  ScalarPtr lr, momentum, dampening, weight_decay;
};

/// The hyper-parameters as the user gave them (Python doubles) plus the StepFlags set.
struct StepHyper {
  double lr, momentum, dampening, weight_decay;
  uint32_t flags;
  AmpPtrs amp;  ///< CUDA only: the CPU path resolves them on the host first (momentum_ops.cpp)
  HyperPtrs dev;  ///< CUDA only, as amp
};

/// One contiguous run of a bf16 parameter with an fp32 master (csrc/include/momentum_cuda/
/// bf16_split.h): the master is join(param, rem, tie), the tie bits packed 8 to a byte (bit j of
/// ties[i / 8] is element i's, i = 8k + j; the last byte's bits past numel are 0). buf is fp32
/// (null without kMomentum), grad bf16 (read only).
struct MasterSpan {
  uint16_t* param;
  float* buf;
  const uint16_t* grad;
  uint16_t* rem;
  uint8_t* ties;
  int64_t numel;
};

/// One contiguous run of a bf16 parameter stepped with stochastic rounding
/// (csrc/include/momentum_cuda/stochastic.h): param, buf (null without kMomentum) and grad are
/// bf16 bits; key seeds the random bits of elements 0 .. numel - 1, which are those of indices
/// offset .. offset + numel - 1 (a shard's place in its whole tensor; 0 for a whole tensor).
struct SrSpan {
  uint16_t* param;
  uint16_t* buf;
  const uint16_t* grad;
  uint32_t key;
  int64_t numel;
  int64_t offset;
};

/// One contiguous run of an fp32 parameter with a bf16 momentum buffer (momentum_dtype.h): buf
/// holds bf16 bits (null without kMomentum); param and grad fp32.
struct Bf16MomSpan {
  float* param;
  uint16_t* buf;
  const float* grad;
  int64_t numel;
};

/// One contiguous run of an fp32 parameter with an int8 momentum buffer (momentum_dtype.h):
/// codes (one per element) and scales (one per kQBlock elements from element 0), both null
/// without kMomentum.
struct Q8Span {
  float* param;
  int8_t* codes;
  const float* grad;
  float* scales;
  int64_t numel;
};

/// One contiguous run of an fp16 parameter with a separate fp32 master (fp16_master.h): param
/// and grad fp16 bits, master and buf fp32 (buf null without kMomentum).
struct Fp16MasterSpan {
  uint16_t* param;
  float* master;
  float* buf;
  const uint16_t* grad;
  int64_t numel;
};

/// kAvx512 uses an AVX-512 (F, BW, VL) clone for bf16/fp16, where the conversions make the loop
/// compute bound (2.2x faster than AVX2 in a microbenchmark here); fp32/fp64 stay on the AVX2
/// clone, which is memory bound already (an AVX-512 clone measured no faster, 2026-11-24).
enum class CpuIsa { kDefault, kAvx2, kAvx512 };

/// Runs the update over every span, all spans in one parallel region (at::parallel_for over
/// the concatenated element range). T: float, double, c10::BFloat16 or c10::Half.
template <class T>
void sgd_step_cpu(const Span* spans, int64_t n_spans, const StepHyper& hyper);

/// torch.optim.SGD's fp32 step on the master of every span (the gradient widened exactly),
/// then the master split again: param = its bf16 rounding, rem and tie what makes it exact.
void sgd_step_master_cpu(const MasterSpan* spans, int64_t n_spans, const StepHyper& hyper);

/// torch.optim.SGD's fp32 step on every span's widened values, the parameter then rounded
/// stochastically to bf16 and the buffer to nearest even.
void sgd_step_sr_cpu(const SrSpan* spans, int64_t n_spans, const StepHyper& hyper);

/// torch.optim.SGD's fp32 step on every span with its bf16 buffer widened; the new buffer
/// rounded to nearest even.
void sgd_step_bf16mom_cpu(const Bf16MomSpan* spans, int64_t n_spans, const StepHyper& hyper);

/// torch.optim.SGD's fp32 step on every span with its int8 buffer read back (code * scale); the
/// new buffer quantized per block (momentum_dtype.h).
void sgd_step_q8_cpu(const Q8Span* spans, int64_t n_spans, const StepHyper& hyper);

/// torch.optim.SGD's fp32 step on every span's master (the fp16 gradient widened exactly); the
/// parameter written as the master rounded to nearest even.
void sgd_step_fp16_master_cpu(const Fp16MasterSpan* spans, int64_t n_spans, const StepHyper& hyper);

/// The instruction set the kernel uses: the best the CPU has (checked at run time: AVX-512
/// F/BW/VL, else AVX2+FMA+F16C, else portable code). Tests force each to check it bitwise.
CpuIsa cpu_isa();
bool cpu_isa_available(CpuIsa isa);
void set_cpu_isa(CpuIsa isa);

}  // namespace momentum_cuda
