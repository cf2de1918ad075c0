// test_bf16.cpp — sgd_math.h's bf16 helpers against c10::BFloat16 (torch's own conversion).
//
// Groups (argv[1], one ctest entry each):
//   round_trip  mc_bf16_bits_to_float(b) == float(c10::BFloat16 b) for all 65,536 bf16 patterns.
//   specials    hand-written cases (ties both ways, subnormals, inf, max-finite rounding to
//               inf, NaNs, signed zero), each against a stated answer AND against c10.
//   sample      mc_float_to_bf16_bits(f) == c10::BFloat16(f).x, bit for bit, for every upper
//               half 0x0000..0xFFFF combined with 40 lower halves (the rounding boundaries
//               0x7FFF/0x8000/0x8001, 0, 1, 0xFFFF, ...) plus 2^26 random patterns.
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <random>
#include <string>

#include "check.h"
#include "momentum_cuda/sgd_math.h"

namespace mc = momentum_cuda;
using mc_test::hex;

namespace {

uint16_t c10_bits(float f) { return c10::BFloat16(f).x; }

/// Compares one pattern; returns true when equal.
bool same(uint32_t u) {
  const float f = mc::mc_bits_float(u);
  return mc::mc_float_to_bf16_bits(f) == c10_bits(f);
}

void group_round_trip() {
  int64_t bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const float ours = mc::mc_bf16_bits_to_float(static_cast<uint16_t>(b));
    const float theirs =
        static_cast<float>(c10::BFloat16(static_cast<uint16_t>(b), c10::BFloat16::from_bits()));
    if (std::memcmp(&ours, &theirs, sizeof ours) != 0 && bad++ == 0) {
      CHECK(false, "bf16 " + hex(b) + " widens to " + hex(mc::mc_float_bits(ours)) +
                       ", c10 gives " + hex(mc::mc_float_bits(theirs)));
    }
  }
  mc_test::g_checks += 65535;  // one check per pattern (the CHECK below counts one)
  CHECK(bad == 0, std::to_string(bad) + " of 65536 bf16 patterns widen differently");
  std::printf("round_trip: 65536 bf16 patterns\n");
}

void group_specials() {
  struct Case {
    uint32_t in;
    uint16_t want;
    const char* what;
  };
  const Case cases[] = {
      {0x00000000u, 0x0000, "+0"},
      {0x80000000u, 0x8000, "-0"},
      {0x3f800000u, 0x3f80, "1.0 exact"},
      {0x3f808000u, 0x3f80, "tie, even below: stays"},
      {0x3f818000u, 0x3f82, "tie, odd below: up"},
      {0x3f807fffu, 0x3f80, "just below tie: down"},
      {0x3f808001u, 0x3f81, "just above tie: up"},
      {0xbf818000u, 0xbf82, "negative tie, odd: away from zero"},
      {0x3f80ffffu, 0x3f81, "round up"},
      {0x3fffffffu, 0x4000, "mantissa carry into exponent"},
      {0x00000001u, 0x0000, "smallest subnormal -> +0"},
      {0x80000001u, 0x8000, "smallest negative subnormal -> -0"},
      {0x00008000u, 0x0000, "subnormal tie, even: stays 0"},
      {0x00018000u, 0x0002, "subnormal tie, odd: up"},
      {0x00010000u, 0x0001, "smallest bf16 subnormal, exact"},
      {0x007fffffu, 0x0080, "largest subnormal -> smallest normal"},
      {0x807fffffu, 0x8080, "negative largest subnormal -> -smallest normal"},
      {0x7f7f0000u, 0x7f7f, "bf16 max finite, exact"},
      {0x7f7f7fffu, 0x7f7f, "just below the tie above bf16 max: stays finite"},
      {0x7f7f8000u, 0x7f80, "tie above bf16 max (odd): rounds to +inf"},
      {0x7f7fffffu, 0x7f80, "fp32 max finite -> +inf"},
      {0xff7fffffu, 0xff80, "-fp32 max finite -> -inf"},
      {0x7f800000u, 0x7f80, "+inf"},
      {0xff800000u, 0xff80, "-inf"},
      {0x7fc00000u, 0x7fc0, "quiet NaN"},
      {0x7f800001u, 0x7fc0, "signalling NaN, low payload (would round to inf if unchecked)"},
      {0x7fbfffffu, 0x7fc0, "NaN whose rounding would carry"},
      {0xffc00000u, 0x7fc0, "negative NaN -> canonical +NaN"},
      {0xffffffffu, 0x7fc0, "all-ones NaN (would wrap to 0 if unchecked)"},
  };
  for (const Case& c : cases) {
    const uint16_t ours = mc::mc_float_to_bf16_bits(mc::mc_bits_float(c.in));
    CHECK(ours == c.want, std::string(c.what) + ": " + hex(c.in) + " -> " + hex(ours) +
                              ", expected " + hex(c.want));
    const uint16_t theirs = c10_bits(mc::mc_bits_float(c.in));
    CHECK(theirs == c.want, std::string("c10 disagrees with the stated answer: ") + c.what +
                                ": " + hex(c.in) + " -> " + hex(theirs));
  }
  std::printf("specials: %zu hand-written cases\n", sizeof cases / sizeof cases[0]);
}

void group_sample() {
  const uint32_t lows[] = {0x0000, 0x0001, 0x0002, 0x00ff, 0x0100, 0x3fff, 0x4000, 0x4001,
                           0x7ffd, 0x7ffe, 0x7fff, 0x8000, 0x8001, 0x8002, 0xbfff, 0xc000,
                           0xfffe, 0xffff};
  std::mt19937_64 r(20240611);
  int64_t n = 0, bad = 0;
  const auto one = [&](uint32_t u) {
    ++n;
    if (!same(u) && bad++ < 10) {
      const float f = mc::mc_bits_float(u);
      CHECK(false, "float " + hex(u) + " -> " + hex(mc::mc_float_to_bf16_bits(f)) +
                       ", c10 gives " + hex(c10_bits(f)));
    }
  };
  for (uint32_t hi = 0; hi < 65536; ++hi) {
    for (uint32_t lo : lows) one((hi << 16) | lo);
    for (int k = 0; k < 22; ++k) one((hi << 16) | static_cast<uint32_t>(r() & 0xffffu));
  }
  for (int64_t k = 0; k < (int64_t{1} << 26); ++k) one(static_cast<uint32_t>(r()));
  mc_test::g_checks += n - 1;  // one check per pattern (the CHECK below counts one)
  CHECK(bad == 0, std::to_string(bad) + " of " + std::to_string(n) + " patterns differ from c10");
  std::printf("sample: %lld float bit patterns (all 65536 upper halves x 40 lower + 2^26 random)\n",
              static_cast<long long>(n));
}

}  // namespace

int main(int argc, char** argv) {
  return mc_test::run_groups(argc, argv,
                             {{"round_trip", group_round_trip},
                              {"specials", group_specials},
                              {"sample", group_sample}});
}
