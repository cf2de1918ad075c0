// host_elementwise.h — one step of an element-wise mode (csrc/cuda/elementwise_kernel.cuh) on the
// host: its spans through plan_elementwise<Mode, Limits>, each batch through
// sgd_elementwise_kernel<Mode> under host_shim's serial runner; and the found_inf of each of a
// case's kSteps steps. Shared by host_bf16_test.cpp and host_qmom_test.cpp.
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

template <class Mode, class Limits>
void host_elementwise_step(const std::vector<typename Mode::Span>& spans,
                           const momentum_cuda::StepScalars<float>& s, uint32_t flags,
                           host_shim::Order order, uint64_t seed, const float* found_inf) {
  using namespace momentum_cuda::cuda;
  plan_elementwise<Mode, Limits>(
      spans.data(), int64_t(spans.size()), s, flags, found_inf, [&](const auto& a, int blocks) {
        host_shim::host_launch(sgd_elementwise_kernel<Mode, Limits::kTensors, Limits::kBlocks>,
                               dim3(unsigned(blocks)), dim3(kThreads), order, seed, a);
      });
}
