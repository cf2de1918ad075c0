// check.h — the tests' whole framework: CHECK counts and reports, run_groups picks the group
// of checks named on the command line (one ctest entry per group), bit helpers.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <string>

namespace mc_test {

inline int64_t g_checks = 0;
inline int64_t g_failures = 0;

inline void report_failure(const char* file, int line, const char* expr, const std::string& msg) {
  ++g_failures;
  if (g_failures <= 25) {
    std::fprintf(stderr, "%s:%d: CHECK(%s) FAILED: %s\n", file, line, expr, msg.c_str());
  } else if (g_failures == 26) {
    std::fprintf(stderr, "... further failures not printed\n");
  }
}

/// CHECK(cond, msg): counts one check; on failure prints file:line, the condition and msg
/// (a std::string or C string, only built on failure) and goes on; main() then exits 1.
#define CHECK(cond, msg)                                                         \
  do {                                                                           \
    ++::mc_test::g_checks;                                                       \
    if (!(cond)) ::mc_test::report_failure(__FILE__, __LINE__, #cond, (msg));    \
  } while (0)

inline std::string hex(uint64_t v) {
  char b[32];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

template <class T>
uint64_t bits_of(const T& x) {
  uint64_t u = 0;
  std::memcpy(&u, &x, sizeof(T));
  return u;
}

/// main(): argv[1] names the group to run; prints the counts; 0 only if every check passed.
inline int run_groups(int argc, char** argv, const std::map<std::string, std::function<void()>>& groups) {
  if (argc != 2 || groups.count(argv[1]) == 0) {
    std::fprintf(stderr, "usage: %s GROUP   (groups:", argc > 0 ? argv[0] : "test");
    for (const auto& kv : groups) std::fprintf(stderr, " %s", kv.first.c_str());
    std::fprintf(stderr, ")\n");
    return 2;
  }
  const auto t0 = std::chrono::steady_clock::now();
  groups.at(argv[1])();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[%s] %lld checks, %lld failures, %.2f s\n", argv[1],
              static_cast<long long>(g_checks), static_cast<long long>(g_failures), s);
  if (g_checks == 0) {
    std::printf("[%s] FAILED: no checks ran\n", argv[1]);
    return 1;
  }
  return g_failures == 0 ? 0 : 1;
}

}  // namespace mc_test
