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
//   - host_launch_warps(...): the same arguments, for kernels with warp shuffles
//     (__shfl_xor_sync, full mask, 4-byte values): the warps run one after the other in the
//     selected order, the 32 lanes of a warp as fibers (ucontext) on this OS thread, each lane
//     run until its next shuffle; a shuffle completes once all 32 lanes have reached it. A lane
//     that returns while others wait in a shuffle (a divergent shuffle: a deadlock or undefined
//     on the GPU), a partial mask, or a shuffle under host_launch aborts with a message.
//     ASan prints a warning that it does not fully support swapcontext (false positives are
//     possible; none seen).
//
// What it cannot do
//   - __syncthreads, shared memory, the other warp intrinsics: NOT defined on purpose, so a
//     kernel that starts using them fails to compile here instead of running wrongly (a barrier
//     over a whole block would need all its threads as fibers, which no kernel needs yet).
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

#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
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


[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "host_shim: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

constexpr int kWarpSize = 32;

/// The fibers of the warp host_launch_warps is running and the shuffle they meet at.
struct Warp {
  enum class State { kRunning, kAtShuffle, kDone };
  // Big enough for a copy of a 32 KB argument struct plus ASan's redzones.
  static constexpr size_t kStack = 256 * 1024;
  ucontext_t sched;
  ucontext_t ctx[kWarpSize];
  std::unique_ptr<char[]> stacks{new char[kStack * kWarpSize]};
  State state[kWarpSize];
  uint32_t give[kWarpSize];  ///< what each lane offers at the current shuffle
  int src[kWarpSize];        ///< the lane whose offer each lane reads
  uint32_t got[kWarpSize];
  int current = -1;  ///< the lane running now
  const std::function<void()>* body = nullptr;
};
inline thread_local Warp* t_warp = nullptr;

/// The lane of the running thread: its linear thread id in the block modulo 32.
inline int lane_id() {
  return static_cast<int>((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) %
                          kWarpSize);
}

inline void lane_entry() {
  Warp* w = t_warp;
  (*w->body)();
  w->state[w->current] = Warp::State::kDone;  // uc_link goes back to the scheduler
}

/// A shuffle from the running lane: offers v, returns lane src's offer once all 32 lanes have
/// reached the shuffle.
inline uint32_t warp_exchange(unsigned mask, uint32_t v, int src) {
  Warp* w = t_warp;
  if (w == nullptr) fail("a warp shuffle outside host_launch_warps (host_launch runs threads "
                         "one after the other)");
  if (mask != 0xffffffffu) fail("warp shuffles are emulated for the full mask only");
  const int lane = w->current;
  if (lane != lane_id()) fail("the running fiber is not the lane of threadIdx");
  w->give[lane] = v;
  w->src[lane] = src;
  w->state[lane] = Warp::State::kAtShuffle;
  swapcontext(&w->ctx[lane], &w->sched);
  return w->got[lane];
}

/// Lane l's fiber, to start lane_entry on its own stack. A function of its own: getcontext
/// returns twice, which would make the caller's locals unreliable.
[[gnu::noinline]] inline void init_lane(Warp& w, int l) {
  if (getcontext(&w.ctx[l]) != 0) fail("getcontext failed");
  w.ctx[l].uc_stack.ss_sp = w.stacks.get() + Warp::kStack * size_t(l);
  w.ctx[l].uc_stack.ss_size = Warp::kStack;
  w.ctx[l].uc_link = &w.sched;
  makecontext(&w.ctx[l], lane_entry, 0);
  w.state[l] = Warp::State::kRunning;
}

/// Runs `body` as the 32 lanes of one warp (tids: their threadIdx) to completion.
inline void run_warp(Warp& w, const std::function<void()>& body, const uint3* tids, uint3 bidx,
                     Order order, std::mt19937_64& rng) {
  w.body = &body;
  for (int l = 0; l < kWarpSize; ++l) init_lane(w, l);
  std::vector<int> lanes(kWarpSize);
  std::iota(lanes.begin(), lanes.end(), 0);
  if (order == Order::kReverse) std::reverse(lanes.begin(), lanes.end());
  for (;;) {  // a round: every lane runs to its next shuffle or its end
    if (order == Order::kShuffled) std::shuffle(lanes.begin(), lanes.end(), rng);
    for (const int l : lanes) {
      if (w.state[l] == Warp::State::kDone) continue;
      w.state[l] = Warp::State::kRunning;
      w.current = l;
      threadIdx = tids[l];
      blockIdx = bidx;
      swapcontext(&w.sched, &w.ctx[l]);
    }
    int done = 0;
    for (int l = 0; l < kWarpSize; ++l) done += w.state[l] == Warp::State::kDone;
    if (done == kWarpSize) break;
    if (done != 0) fail("divergent warp shuffle: some lanes returned while others wait in one");
    for (int l = 0; l < kWarpSize; ++l) w.got[l] = w.give[w.src[l]];
  }
  w.current = -1;
}

/// kernel<<<grid, block>>>(args...) on the host for kernels with warp shuffles: the warps one
/// after the other in `order`, the lanes of each as fibers in lock step at every shuffle (in
/// `order` within each round, shuffled anew each round). The block's thread count must be a
/// multiple of 32; lanes are consecutive linear thread ids, as on the GPU.
template <class... KArgs, class... Args>
void host_launch_warps(void (*kernel)(KArgs...), dim3 grid, dim3 block, Order order,
                       uint64_t seed, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args),
                "host_launch_warps: wrong number of arguments");
  check_config(grid, block);
  const uint64_t per_block = uint64_t{block.x} * block.y * block.z;
  if (per_block % kWarpSize != 0) fail("host_launch_warps: block size not a multiple of 32");
  const std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z, warps = per_block / kWarpSize;
  const std::vector<uint64_t> ids = thread_order(blocks * warps, order, seed);
  std::mt19937_64 rng(seed ^ 0x5851F42D4C957F2Dull);
  auto w = std::make_unique<Warp>();
  const dim3 saved_grid = gridDim, saved_block = blockDim;
  const uint3 saved_bidx = blockIdx, saved_tidx = threadIdx;
  gridDim = grid;
  blockDim = block;
  Warp* const saved_warp = t_warp;
  t_warp = w.get();
  uint3 tids[kWarpSize];
  for (const uint64_t id : ids) {
    const uint64_t b = id / warps;
    const uint3 bidx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                     static_cast<unsigned>(b / grid.x / grid.y)};
    for (int l = 0; l < kWarpSize; ++l) {
      const uint64_t t = id % warps * kWarpSize + uint64_t(l);
      tids[l] = uint3{static_cast<unsigned>(t % block.x),
                      static_cast<unsigned>(t / block.x % block.y),
                      static_cast<unsigned>(t / block.x / block.y)};
    }
    run_warp(*w, body, tids, bidx, order, rng);
  }
  t_warp = saved_warp;
  gridDim = saved_grid;
  blockDim = saved_block;
  blockIdx = saved_bidx;
  threadIdx = saved_tidx;
  stats().launches += 1;
  stats().thread_runs += blocks * per_block;
}

template <class T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) == 4, "4-byte shuffles only");
  if (width != kWarpSize || lane_mask < 0 || lane_mask >= kWarpSize)
    fail("__shfl_xor_sync: only width 32 and lane masks 0..31 are emulated");
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = warp_exchange(mask, u, lane_id() ^ lane_mask);
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace host_shim

// The shuffles of CUDA's sm_30_intrinsics.h that the kernels use, over host_launch_warps.
inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask, int width = 32) {
  return host_shim::shfl_xor(mask, v, lane_mask, width);
}
inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int width = 32) {
  return host_shim::shfl_xor(mask, v, lane_mask, width);
}
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
  return host_shim::shfl_xor(mask, v, lane_mask, width);
}
