// host_shim.h — lets the CUDA kernel source (csrc/cuda/sgd_kernel.cuh) compile with g++ as host
// code and run serially on the CPU: the GPU-less evidence of tests/test_cuda_host.py.
//
// What it provides
//   - __global__ / __device__ / __host__ / __forceinline__ / __launch_bounds__ / __restrict__:
//     CUDA's own crt/host_defines.h (pulled in by vector_types.h) already defines them for a host
//     compiler (__global__ etc. as nothing, __forceinline__ as always_inline); the fallbacks below
//     only apply if a future toolkit stops doing so.
//   - uint3 / dim3 / uint4 / float4 from CUDA's vector_types.h, so the 16-byte types have their
//     real alignment (a misaligned 16-byte access is then undefined behaviour that UBSan reports).
//   - threadIdx / blockIdx / blockDim / gridDim as thread_local globals.
//   - host_launch(kernel, grid, block, order, seed, args...): runs every (block, thread) of the
//     grid one after the other, each to completion, in a selectable order (forward, reverse, or
//     shuffled with a seed) so that a result depending on the thread order would show.
//
// What it cannot do
//   - __syncthreads, shared memory, warp intrinsics: NOT defined on purpose, so a kernel that
//     starts using them fails to compile here instead of running wrongly (a serial run of whole
//     threads cannot honour a barrier; that would need one OS thread per CUDA thread).
//   - Anything about performance, coalescing or the GPU memory model.
//
// __CUDA_ARCH__ and __CUDACC__ stay undefined: sgd_math.h then takes its host path (std::fma,
// which is bit-identical to __fmaf_rn / __fma_rn: both are single-rounding IEEE fma).
#pragma once

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "host_shim.h is for a host compiler (g++/clang++), not nvcc"
#endif

#include <vector_types.h>  // uint3, dim3, uint4, float4 (and crt/host_defines.h)
#include <cuda_bf16.h>     // compile as host code: RNE conversions, + - *
#include <cuda_fp16.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

static_assert(alignof(uint4) == 16 && sizeof(uint4) == 16, "vector_types.h: uint4 not 16-aligned");
static_assert(alignof(float4) == 16, "vector_types.h: float4 not 16-aligned");
static_assert(sizeof(dim3) == 12 && sizeof(uint3) == 12, "unexpected dim3/uint3 layout");

// The built-in variables. thread_local so that a future multi-threaded runner (one OS thread per
// CUDA thread) can reuse them unchanged; the serial runner below sets them before each call.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace host_shim {

/// The order in which the (block, thread) pairs of a grid run.
enum class Order { kForward, kReverse, kShuffled };

inline const char* order_name(Order o) {
  switch (o) {
    case Order::kForward: return "forward";
    case Order::kReverse: return "reverse";
    case Order::kShuffled: return "shuffled";
  }
  return "?";
}

/// Statistics of the launches made through host_launch (the driver prints them).
struct LaunchStats {
  uint64_t launches = 0;
  uint64_t thread_runs = 0;
};
inline LaunchStats& stats() {
  static LaunchStats s;
  return s;
}

/// Linear ids 0 .. n-1 of the threads of a grid (x fastest, then y, z; blocks likewise),
/// permuted by `order`.
inline std::vector<uint64_t> thread_order(uint64_t n, Order order, uint64_t seed) {
  std::vector<uint64_t> ids(n);
  std::iota(ids.begin(), ids.end(), uint64_t{0});
  if (order == Order::kReverse) {
    std::reverse(ids.begin(), ids.end());
  } else if (order == Order::kShuffled) {
    std::mt19937_64 rng(seed);
    std::shuffle(ids.begin(), ids.end(), rng);
  }
  return ids;
}

/// Checks a launch configuration the way the CUDA runtime would reject it.
inline void check_config(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0)
    throw std::invalid_argument("host_launch: empty grid or block (cudaErrorInvalidConfiguration)");
  if (threads > 1024 || block.z > 64)
    throw std::invalid_argument("host_launch: block too large (cudaErrorInvalidConfiguration)");
  if (grid.y > 65535 || grid.z > 65535)
    throw std::invalid_argument("host_launch: grid.y/z > 65535 (cudaErrorInvalidConfiguration)");
}

/// Runs kernel<<<grid, block>>>(args...) on the host, one CUDA thread after the other.
/// The arguments are converted once to the kernel's parameter types (as the CUDA runtime copies
/// them into the parameter buffer) and every thread gets its own copy, as by-value kernel
/// parameters are per thread.
template <class... KArgs, class... Args>
void host_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, Order order, uint64_t seed,
                 Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "host_launch: wrong number of arguments");
  check_config(grid, block);
  const std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  const uint64_t per_block = uint64_t{block.x} * block.y * block.z;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  const std::vector<uint64_t> ids = thread_order(per_block * blocks, order, seed);
  const dim3 saved_grid = gridDim, saved_block = blockDim;
  const uint3 saved_bidx = blockIdx, saved_tidx = threadIdx;
  gridDim = grid;
  blockDim = block;
  for (const uint64_t id : ids) {
    const uint64_t b = id / per_block, t = id % per_block;
    blockIdx = uint3{static_cast<unsigned>(b % grid.x),
                     static_cast<unsigned>(b / grid.x % grid.y),
                     static_cast<unsigned>(b / grid.x / grid.y)};
    threadIdx = uint3{static_cast<unsigned>(t % block.x),
                      static_cast<unsigned>(t / block.x % block.y),
                      static_cast<unsigned>(t / block.x / block.y)};
    std::apply(kernel, params);  // copies each by-value parameter, as a thread would see it
  }
  gridDim = saved_grid;
  blockDim = saved_block;
  blockIdx = saved_bidx;
  threadIdx = saved_tidx;
  stats().launches += 1;
  stats().thread_runs += ids.size();
}

}  // namespace host_shim
