// test_fp16.cpp — sgd_math.h's fp16 helpers against c10::Half (torch's own conversion).
//
// Groups (argv[1], one ctest entry each):
//   round_trip  mc_fp16_bits_to_float(h) == float(c10::Half h), bit for bit, for all 65,536 fp16
//               patterns (normals, subnormals, zeros, infinities, NaNs).
//   exhaustive  mc_float_to_fp16_bits(f) == c10::Half(f).x for EVERY one of the 2^32 fp32 bit
//               patterns (round to nearest even at every exponent, subnormal fp16 results,
//               overflow to inf, NaNs).
//   specials    hand-written cases with stated answers, so the test does not only trust c10.
// The helpers are branch-free rewrites (so the CPU kernel's fp16 loop vectorizes); this is what
// proves they are the same function as c10's.
#include <c10/util/Half.h>

#include <cstdint>
#include <string>

#include "check.h"
#include "momentum_cuda/sgd_math.h"

namespace mc = momentum_cuda;
using mc_test::hex;

namespace {

uint16_t c10_bits(float f) { return c10::Half(f).x; }

void group_round_trip() {
  int64_t bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float ours = mc::mc_fp16_bits_to_float(static_cast<uint16_t>(h));
    const float theirs =
        static_cast<float>(c10::Half(static_cast<uint16_t>(h), c10::Half::from_bits()));
    if (std::memcmp(&ours, &theirs, sizeof ours) != 0 && bad++ < 10) {
      CHECK(false, "fp16 " + hex(h) + " widens to " + hex(mc::mc_float_bits(ours)) +
                       ", c10 gives " + hex(mc::mc_float_bits(theirs)));
    }
  }
  mc_test::g_checks += 65535;
  CHECK(bad == 0, std::to_string(bad) + " of 65536 fp16 patterns widen differently");
  std::printf("round_trip: 65536 fp16 patterns\n");
}

void group_exhaustive() {
  int64_t bad = 0;
  uint32_t u = 0;
  do {
    const float f = mc::mc_bits_float(u);
    const uint16_t ours = mc::mc_float_to_fp16_bits(f);
    if (ours != c10_bits(f) && bad++ < 10) {
      CHECK(false, "float " + hex(u) + " -> " + hex(ours) + ", c10 gives " + hex(c10_bits(f)));
    }
  } while (++u != 0);
  mc_test::g_checks += (int64_t{1} << 32) - 1;
  CHECK(bad == 0, std::to_string(bad) + " of 2^32 fp32 patterns narrow differently from c10");
  std::printf("exhaustive: all 2^32 fp32 bit patterns\n");
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
      {0x3f800000u, 0x3c00, "1.0"},
      {0x3f801000u, 0x3c00, "1 + half an fp16 ulp: tie, even below, stays"},
      {0x3f803000u, 0x3c02, "1 + 1.5 ulp: tie, odd below, up"},
      {0x3f801001u, 0x3c01, "just above the tie: up"},
      {0x477fe000u, 0x7bff, "65504, fp16 max"},
      {0x477fefffu, 0x7bff, "just below the tie above 65504: stays finite"},
      {0x477ff000u, 0x7c00, "tie above 65504: to +inf"},
      {0x33800000u, 0x0001, "2^-24, smallest fp16 subnormal"},
      {0x33000000u, 0x0000, "2^-25: tie between 0 and the smallest subnormal, to even (0)"},
      {0x33000001u, 0x0001, "just above 2^-25: up"},
      {0x38800000u, 0x0400, "2^-14, smallest fp16 normal"},
      {0x387fc000u, 0x03ff, "2^-14 - 2^-24, largest fp16 subnormal, exact"},
      {0x387fe000u, 0x0400, "largest subnormal + half ulp: tie, odd below, up to 2^-14"},
      {0x7f800000u, 0x7c00, "+inf"},
      {0xff800000u, 0xfc00, "-inf"},
      {0x7fc00000u, 0x7e00, "quiet NaN"},
      {0xffc00001u, 0xfe00, "negative NaN keeps its sign"},
      {0x7f800001u, 0x7e00, "signalling NaN with a low payload stays NaN"},
  };
  for (const Case& c : cases) {
    const uint16_t ours = mc::mc_float_to_fp16_bits(mc::mc_bits_float(c.in));
    CHECK(ours == c.want, std::string(c.what) + ": " + hex(c.in) + " -> " + hex(ours) +
                              ", expected " + hex(c.want));
    const uint16_t theirs = c10_bits(mc::mc_bits_float(c.in));
    CHECK(theirs == c.want,
          std::string("c10 disagrees with the stated answer: ") + c.what + ": " + hex(theirs));
  }
  std::printf("specials: %zu hand-written cases\n", sizeof cases / sizeof cases[0]);
}

}  // namespace

int main(int argc, char** argv) {
  return mc_test::run_groups(argc, argv,
                             {{"round_trip", group_round_trip},
                              {"exhaustive", group_exhaustive},
                              {"specials", group_specials}});
}
