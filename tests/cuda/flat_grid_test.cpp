// flat_grid_test.cpp — the flat launcher's grid size, cuda::flat_grid (csrc/cuda/sgd_kernel.cuh,
// what sgd_cuda.cu launches with the occupancy API's blocks per SM), against its definition
// computed here in 128 bits:
//   min(ceil(numel / (kThreads * Pack<T>::kN)), blocks_per_sm * sms)
// So: never more blocks than can be resident at once, never more than the work needs (one
// 16-byte pack a thread), at least one for any work, 0 for none, and no overflow for spans of
// 2^31 and more elements up to 2^63 - 1. Every dtype (the pack size differs).
//
// Build: as host_kernel_test.cpp (tests/test_cuda_host.py; a small file, so it also runs under
// ASan + UBSan, where a signed overflow in flat_grid is reported).
// Exit status: 0 if every check matched, 1 otherwise.
#include "host_shim.h"

#include "sgd_kernel.cuh"

#include <cstdint>
#include <cstdio>

using namespace momentum_cuda;

namespace {

uint64_t g_checks = 0, g_mismatches = 0;

template <class T>
void check_dtype(const char* name) {
  const int64_t per_block = int64_t{cuda::kThreads} * cuda::Pack<T>::kN;
  const int64_t two31 = int64_t{1} << 31;
  const int64_t sizes[] = {0,
                           1,
                           per_block - 1,
                           per_block,
                           per_block + 1,
                           792 * per_block,
                           792 * per_block + 1,
                           two31 - 1,
                           two31,
                           two31 + 1,
                           int64_t{1} << 32,
                           int64_t{3} << 40,
                           INT64_MAX - per_block,
                           INT64_MAX};
  // (blocks per SM, SMs): one SM; an H200 (132 SMs) at 6 (these kernels' registers), 8 and 32
  // (the hardware's most) blocks an SM; an A100 (108 SMs).
  const int occupancy[][2] = {{1, 1}, {16, 1}, {6, 132}, {8, 132}, {32, 132}, {6, 108}};
  for (const int64_t n : sizes) {
    for (const auto& o : occupancy) {
      const int64_t got = cuda::flat_grid<T>(n, o[0], o[1]);
      const __int128 needed = (static_cast<__int128>(n) + per_block - 1) / per_block;
      const __int128 resident = static_cast<__int128>(o[0]) * o[1];
      const __int128 want = needed < resident ? needed : resident;
      ++g_checks;
      if (static_cast<__int128>(got) != want) {
        ++g_mismatches;
        std::fprintf(stderr, "MISMATCH flat_grid<%s>(%lld, %d, %d) = %lld, want %lld\n", name,
                     static_cast<long long>(n), o[0], o[1], static_cast<long long>(got),
                     static_cast<long long>(want));
      }
    }
  }
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // keep what was printed if a sanitizer aborts
#ifdef HKT_PLANTED_BUG
  std::printf("planted bug: %s\n", HKT_PLANTED_BUG);  // proves the patched header was compiled
#endif
  check_dtype<float>("float");
  check_dtype<double>("double");
  check_dtype<cuda::bf16_t>("bf16_t");
  check_dtype<cuda::fp16_t>("fp16_t");
  std::printf("flat_grid checks: %llu, mismatches: %llu\n",
              static_cast<unsigned long long>(g_checks),
              static_cast<unsigned long long>(g_mismatches));
  return g_mismatches == 0 ? 0 : 1;
}
