// test_bf16_split.cpp — bf16_split.h: an fp32 master as bf16 parameter + remainder + tie bit.
//
// Groups (argv[1], one ctest entry each):
//   exhaustive  for EVERY one of the 2^32 fp32 patterns: split's parameter is c10::BFloat16's
//               (round to nearest even), the tie bit is set only on a halfway point rounded
//               up, the triple is consistent, and join gives the pattern back bit for bit (a
//               NaN: a NaN, parameter 0x7FC0). It also counts the preimages of every bf16
//               value: 65,537 for each even finite one, so 16 bits of remainder cannot be
//               enough; the tie bit is what makes the split exact.
//   specials    hand-written cases with stated answers (ties both ways, the largest finite
//               value rounding to inf, subnormals, signed zeros, inf, NaN).
//   inconsistent triples no split gives (a parameter written after the split) are told apart.
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "momentum_cuda/bf16_split.h"

namespace mc = momentum_cuda;
using mc_test::hex;

namespace {

void group_exhaustive() {
  std::vector<uint32_t> preimages(65536, 0);
  int64_t bad = 0, ties = 0;
  uint32_t u = 0;
  do {
    const float m = mc::mc_bits_float(u);
    const mc::Bf16Split s = mc::mc_bf16_split(m);
    const float back = mc::mc_bf16_join(s.param, s.rem, s.tie);
    const bool nan = std::isnan(m);
    const bool ok = s.param == c10::BFloat16(m).x && s.rem == (u & 0xffffu) &&
                    (!s.tie || s.rem == 0x8000u) &&
                    mc::mc_bf16_split_consistent(s.param, s.rem, s.tie) &&
                    (nan ? std::isnan(back) && s.param == 0x7fc0u : mc::mc_float_bits(back) == u);
    if (!ok && bad++ < 10) {
      CHECK(false, "master " + hex(u) + ": param " + hex(s.param) + " (c10 " +
                       hex(c10::BFloat16(m).x) + "), rem " + hex(s.rem) + ", tie " +
                       std::to_string(s.tie) + ", joins to " + hex(mc::mc_float_bits(back)));
    }
    ties += s.tie;
    if (!nan) ++preimages[s.param];
  } while (++u != 0);
  mc_test::g_checks += (int64_t{1} << 32) - 1;
  CHECK(bad == 0, std::to_string(bad) + " of 2^32 fp32 patterns do not split and join back");
  // Every finite bf16 value but the largest ones, by parity of its last bit: the halfway points
  // on both sides round to an even value (65,537 preimages) and away from an odd one (65,535).
  int64_t wrong_counts = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint32_t mag = b & 0x7fffu;
    if (mag == 0 || mag >= 0x7f7fu) continue;  // zeros, the largest finite, inf, NaN: edges
    const uint32_t want = (b & 1u) ? 65535u : 65537u;
    if (preimages[b] != want && wrong_counts++ < 10) {
      CHECK(false, "bf16 " + hex(b) + " has " + std::to_string(preimages[b]) + " preimages, not " +
                       std::to_string(want));
    }
  }
  mc_test::g_checks += 65535;
  CHECK(wrong_counts == 0, std::to_string(wrong_counts) + " bf16 values with other counts");
  CHECK(preimages[0x3f80] == 65537u, "1.0 (even) is the rounding of 65,537 fp32 patterns");
  // one tie bit per even finite value rounded up to (and the two infinities, from 0x7F7F8000)
  CHECK(ties > 0, "some halfway point rounds up");
  std::printf("exhaustive: all 2^32 fp32 patterns, %lld with the tie bit set\n",
              static_cast<long long>(ties));
}

void group_specials() {
  struct Case {
    uint32_t master;
    uint16_t param, rem;
    bool tie;
    const char* what;
  };
  const Case cases[] = {
      {0x3f800000u, 0x3f80, 0x0000, false, "1.0"},
      {0x3f808000u, 0x3f80, 0x8000, false, "halfway above 1.0: down to the even 0x3F80"},
      {0x3f818000u, 0x3f82, 0x8000, true, "halfway above 0x3F81: up to the even 0x3F82"},
      {0x3f7f8000u, 0x3f80, 0x8000, true, "halfway below 1.0: up to the even 0x3F80"},
      {0x3f808001u, 0x3f81, 0x8001, false, "just above halfway: up"},
      {0x3f807fffu, 0x3f80, 0x7fff, false, "just below halfway: down"},
      {0x3f7fffffu, 0x3f80, 0xffff, false, "just below 1.0: up across the binade"},
      {0xbf818000u, 0xbf82, 0x8000, true, "negative halfway, up in magnitude"},
      {0x7f7fffffu, 0x7f80, 0xffff, false, "largest finite: the parameter is inf"},
      {0x7f7f8000u, 0x7f80, 0x8000, true, "halfway below inf: inf"},
      {0x7f800000u, 0x7f80, 0x0000, false, "inf"},
      {0xff800000u, 0xff80, 0x0000, false, "-inf"},
      {0x00000000u, 0x0000, 0x0000, false, "+0"},
      {0x80000000u, 0x8000, 0x0000, false, "-0"},
      {0x00008000u, 0x0000, 0x8000, false, "smallest halfway: down to +0"},
      {0x00018000u, 0x0002, 0x8000, true, "subnormal halfway above an odd value: up"},
      {0x80000001u, 0x8000, 0x0001, false, "negative subnormal: -0"},
  };
  for (const Case& c : cases) {
    const mc::Bf16Split s = mc::mc_bf16_split(mc::mc_bits_float(c.master));
    CHECK(s.param == c.param && s.rem == c.rem && s.tie == c.tie,
          std::string(c.what) + ": got " + hex(s.param) + "/" + hex(s.rem) + "/" +
              std::to_string(s.tie));
    CHECK(mc::mc_float_bits(mc::mc_bf16_join(c.param, c.rem, c.tie)) == c.master,
          std::string(c.what) + ": join");
  }
  const mc::Bf16Split n = mc::mc_bf16_split(mc::mc_bits_float(0xffc12345u));  // -NaN, payload
  CHECK(n.param == 0x7fc0u && std::isnan(mc::mc_bf16_join(n.param, n.rem, n.tie)),
        "a NaN master: parameter 0x7FC0, joins to a NaN");
  std::printf("specials: %zu stated cases\n", sizeof cases / sizeof cases[0]);
}

void group_inconsistent() {
  // A parameter written after the split keeps a remainder that is not its own.
  CHECK(!mc::mc_bf16_split_consistent(0x0000, 0x9000, false),
        "+0 with a remainder above halfway (its master would round up from -NaN)");
  CHECK(!mc::mc_bf16_split_consistent(0x3f81, 0x8000, false),
        "an odd parameter with a halfway remainder (a halfway point rounds to even)");
  CHECK(!mc::mc_bf16_split_consistent(0x3f80, 0x1234, true),
        "the tie bit without a halfway remainder");
  CHECK(mc::mc_bf16_split_consistent(0x3f80, 0x1234, false), "a split's own triple");
  CHECK(mc::mc_bf16_split_consistent(0x4000, 0xffff, false),
        "2.0 with the remainder of 1.99999988: consistent (a write cannot always be seen)");
  std::printf("inconsistent: 5 cases\n");
}

}  // namespace

int main(int argc, char** argv) {
  return mc_test::run_groups(argc, argv, {{"exhaustive", group_exhaustive},
                                          {"specials", group_specials},
                                          {"inconsistent", group_inconsistent}});
}
