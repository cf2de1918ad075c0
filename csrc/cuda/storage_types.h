// storage_types.h — 16-bit storage types of the CUDA kernels, bit-compatible with at::BFloat16
// and at::Half, so the torch-facing file can pass torch's pointers without ATen in the kernels.
#pragma once

#include <cstdint>

namespace momentum_cuda {
namespace cuda {

struct bf16_t {
  uint16_t x;
};
struct fp16_t {
  uint16_t x;
};

}  // namespace cuda
}  // namespace momentum_cuda
