// host_elementwise.h — one step of an element-wise mode (csrc/cuda/elementwise_kernel.cuh) on the
// host: its spans through plan_elementwise<Mode, Limits>, each batch through
// sgd_elementwise_kernel<Mode> under host_shim's serial runner; and the found_inf and the
// hyper-parameters in device memory of each of a case's kSteps steps. Shared by
// host_bf16_test.cpp and host_qmom_test.cpp.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "host_shim.h"  // first: the kernels need its threadIdx & co.

#include "elementwise_kernel.cuh"

/// Steps of a mode's case: the last one skipped by GradScaler's found_inf.
constexpr int kSteps = 4;

/// GradScaler's found_inf of step `step` of a case: none (steps 0 and 1), 0 (step 2: given, the
/// step runs) and 1 or NaN by the seed (step 3: skipped, so nothing may change).
inline const float* found_inf_of(int step, uint64_t seed) {
  static const float zero = 0.f, one = 1.f, nan = std::numeric_limits<float>::quiet_NaN();
  return step < 2 ? nullptr : step == 2 ? &zero : seed % 2 ? &nan : &one;
}

/// How step `step` of a case hands the kernel its hyper-parameters. Step 1 puts all four in
/// device memory (HyperPtrs; the shim's device memory is the host's): lr and dampening as
/// doubles, momentum and weight_decay as floats (each rounds to the fp32 scalar the host would
/// give), and the scalars passed by value are NaN (`scalars`), so a kernel that does not read
/// the pointers fails. With (seed / 2) odd the momentum and weight_decay there are 0, which
/// skips their ops as torch's `!= 0` tests do: the buffers (and int8 scales) must stay as they
/// are; the reference steps with `ref_flags`.
struct DeviceHyper {
  double lr = 0, dampening = 0;
  float momentum = 0, wd = 0;
  bool on = false, zeroed = false;

  momentum_cuda::HyperPtrs ptrs() const {
    if (!on) return {};
    return {{nullptr, &lr}, {&momentum, nullptr}, {nullptr, &dampening}, {&wd, nullptr}};
  }
  momentum_cuda::StepScalars<float> scalars(const momentum_cuda::StepScalars<float>& s) const {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    return on ? momentum_cuda::StepScalars<float>{nan, nan, nan, nan, nan} : s;
  }
  uint32_t ref_flags(uint32_t f) const {
    using namespace momentum_cuda;
    return zeroed ? f & ~(kMomentum | kNesterov | kFirstStep | kWeightDecay) : f;
  }
};

/// DeviceHyper of step `step` of a case with the hyper-parameters h (lr, momentum, dampening,
/// wd).
template <class H>
DeviceHyper device_hyper_of(int step, uint64_t seed, const H& h) {
  DeviceHyper d;
  if (step != 1) return d;
  d.on = true;
  d.zeroed = (seed / 2) % 2 == 1;
  d.lr = h.lr;
  d.dampening = h.dampening;
  d.momentum = d.zeroed ? 0.f : static_cast<float>(h.momentum);
  d.wd = d.zeroed ? 0.f : static_cast<float>(h.wd);
  return d;
}

template <class Mode, class Limits>
void host_elementwise_step(const std::vector<typename Mode::Span>& spans,
                           const momentum_cuda::StepScalars<float>& s, uint32_t flags,
                           host_shim::Order order, uint64_t seed, const float* found_inf,
                           const DeviceHyper& dh) {
  using namespace momentum_cuda::cuda;
  plan_elementwise<Mode, Limits>(
      spans.data(), int64_t(spans.size()), dh.scalars(s), flags, found_inf, dh.ptrs(),
      [&](const auto& a, int blocks) {
        host_shim::host_launch(sgd_elementwise_kernel<Mode, Limits::kTensors, Limits::kBlocks>,
                               dim3(unsigned(blocks)), dim3(kThreads), order, seed, a);
      });
}
