// host_elementwise.h — one step of an element-wise mode (csrc/cuda/elementwise_kernel.cuh) on the
// host: its spans through plan_elementwise<Mode, Limits>, each batch through
// sgd_elementwise_kernel<Mode> under host_shim's serial runner. Shared by host_bf16_test.cpp and
// host_qmom_test.cpp.
#pragma once

#include <cstdint>
#include <vector>

#include "host_shim.h"  // first: the kernels need its threadIdx & co.

#include "elementwise_kernel.cuh"

template <class Mode, class Limits>
void host_elementwise_step(const std::vector<typename Mode::Span>& spans,
                           const momentum_cuda::StepScalars<float>& s, uint32_t flags,
                           host_shim::Order order, uint64_t seed) {
  using namespace momentum_cuda::cuda;
  plan_elementwise<Mode, Limits>(
      spans.data(), int64_t(spans.size()), s, flags, [&](const auto& a, int blocks) {
        host_shim::host_launch(sgd_elementwise_kernel<Mode, Limits::kTensors, Limits::kBlocks>,
                               dim3(unsigned(blocks)), dim3(kThreads), order, seed, a);
      });
}
