// host_qmom_test.cpp — runs the momentum_dtype kernels (csrc/cuda/qmom_kernel.cuh) on the host
// through host_shim.h and checks them BITWISE against the naive loops of the contract
// (csrc/include/momentum_cuda/momentum_dtype.h), written here one element and one block at a
// time as the contract states them:
//   bf16 buffers: bf16mom_elem on every element in turn;
//   int8 buffers: per block of kQBlock elements (counted from each span's element 0, the last
//   partial), q8_elem on each element (the old scale read unless first step), then the absmax
//   as a plain max of q8_abs_bits, q8_scale, q8_code on each element.
// The bf16 kernel runs under host_launch (threads one after the other); the int8 kernel under
// host_launch_warps (its warp shuffles run in lock step).
//
// Cases: all 20 flag sets; sizes 0, 1, 3, 7, 8, 97, 255, 256, 257, 1000, 2^16 + 3 (and one
// 2^20 + 3); element offsets that make the vector path run, not run, or run for some arrays only;
// ListLimits32K, ListLimits4K and tiny batch limits, and hundreds of small spans (several
// launches, spans split over launches); three steps (the first one with kFirstStep where the set
// has it; its codes and scales are garbage, NaN scales included); forward, reverse and shuffled
// warp and lane orders. Each step gives every int8 block a kind: random, all zero (old scale 0),
// subnormal values (old scale subnormal), a NaN or an infinity in the gradient, gradients near
// FLT_MAX (the buffer overflows), or an old NaN scale. Without kMomentum the codes, scales and
// bf16 buffers must stay as they were; memory around every array is filled with canaries and
// checked after each step.
//
// Build: g++ <csrc/build_flags.json's "cxx"> -O1 -I tests/cuda -I csrc/cuda -I csrc
//        -I csrc/include -I <cuda>/include tests/cuda/host_qmom_test.cpp
//        (tests/test_cuda_host.py does this, also under ASan+UBSan and with planted bugs)
// Usage: host_qmom_test [--quick] [--fail-fast]; exit status 0 iff everything matched.
#include "host_shim.h"

#include "qmom_kernel.cuh"

#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

using namespace momentum_cuda;
using host_shim::Order;

namespace {

bool g_quick = false, g_fail_fast = false;
uint64_t g_cases = 0, g_elements = 0, g_mismatches = 0;
struct FailFast {};

void report(const std::string& msg) {
  if (g_mismatches < 25) std::fprintf(stderr, "MISMATCH %s\n", msg.c_str());
  ++g_mismatches;
  if (g_fail_fast) throw FailFast{};
}

uint32_t fbits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bitsf(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 91) {}
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float value() {  // nonzero, magnitude in [2^-6, 4), random sign and mantissa
    const uint64_t r = next();
    const float v = std::ldexp(1.f + static_cast<float>(r & 0x7fffff) / 8388608.f,
                               static_cast<int>((r >> 23) % 8) - 6);
    return (r >> 63) ? -v : v;
  }
  float subnormal() { return bitsf(static_cast<uint32_t>(next()) & 0x807fffffu); }
  int8_t code() { return static_cast<int8_t>(static_cast<int>(next() % 255) - 127); }
};

/// [canaries | offset | n elements | canaries], 64-byte aligned base.
template <class T>
struct Guarded {
  static constexpr int64_t kPad = 16;
  T* base = nullptr;
  int64_t start = 0, n = 0;
  Guarded(int64_t n_, int offset) : start(kPad + offset), n(n_) {
    base = static_cast<T*>(
        ::operator new(sizeof(T) * size_t(start + n + kPad), std::align_val_t(64)));
    std::memset(static_cast<void*>(base), 0x5B, sizeof(T) * size_t(start + n + kPad));
  }
  Guarded(const Guarded&) = delete;
  ~Guarded() { ::operator delete(base, std::align_val_t(64)); }
  T* data() { return base + start; }
  bool canaries_intact() const {
    const auto* bytes = reinterpret_cast<const unsigned char*>(base);
    const size_t lo = sizeof(T) * size_t(start), hi = sizeof(T) * size_t(start + n);
    for (size_t i = 0; i < sizeof(T) * size_t(start + n + kPad); ++i) {
      if ((i < lo || i >= hi) && bytes[i] != 0x5B) return false;
    }
    return true;
  }
};

struct Hyper {
  double lr, momentum, dampening, wd;
};

int64_t q_blocks(int64_t n) { return (n + kQBlock - 1) / kQBlock; }

/// The kinds of int8 blocks a step is given (Span::new_grad).
enum Kind { kRandom, kZero, kTiny, kNan, kInf, kHuge, kNanScale, kKinds };

/// One span of either buffer kind: the kernel's arrays and the reference's copies.
struct Span {
  int64_t n;
  bool int8;
  Guarded<float> p, g;
  Guarded<int8_t> q;     // int8 codes
  Guarded<float> sc;     // int8 scales
  Guarded<uint16_t> b;   // bf16 buffer
  std::vector<float> rp, rsc;
  std::vector<int8_t> rq;
  std::vector<uint16_t> rb;
  Span(int64_t n_, bool int8_, const std::array<int, 3>& off, Rng& rng)
      : n(n_), int8(int8_), p(n_, off[0]), g(n_, off[1]), q(int8_ ? n_ : 0, off[2]),
        sc(int8_ ? q_blocks(n_) : 0, off[2] % 2), b(int8_ ? 0 : n_, off[2]), rp(size_t(n_)),
        rsc(size_t(sc.n)), rq(size_t(q.n)), rb(size_t(b.n)) {
    for (int64_t i = 0; i < n; ++i) rp[size_t(i)] = p.data()[i] = rng.value() * 4.f;
    garbage_buffer(rng);
  }
  /// What a first step finds: random codes, scales (NaN and inf among them) and bf16 bits.
  void garbage_buffer(Rng& rng) {
    for (int64_t i = 0; i < q.n; ++i) rq[size_t(i)] = q.data()[i] = static_cast<int8_t>(rng.next());
    for (int64_t k = 0; k < sc.n; ++k) {
      const uint64_t r = rng.next();
      rsc[size_t(k)] = sc.data()[k] = r % 5 == 0   ? std::numeric_limits<float>::quiet_NaN()
                                      : r % 5 == 1 ? std::numeric_limits<float>::infinity()
                                                   : bitsf(static_cast<uint32_t>(r >> 32));
    }
    for (int64_t i = 0; i < b.n; ++i) {
      rb[size_t(i)] = b.data()[i] = static_cast<uint16_t>(rng.next());
    }
  }
  /// New gradients; every block of kQBlock elements gets a kind. The old buffer is changed
  /// where a kind needs it (kZero, kTiny, kNanScale), in the kernel's and the reference's
  /// copies alike.
  void new_grad(Rng& rng) {
    for (int64_t k = 0; k < q_blocks(n); ++k) {
      const int64_t i0 = k * kQBlock, i1 = std::min<int64_t>(n, i0 + kQBlock);
      const uint64_t r = rng.next();
      const Kind kind = r % 3 != 0 ? kRandom : static_cast<Kind>((r >> 8) % kKinds);
      const int64_t special = i0 + static_cast<int64_t>((r >> 16) % uint64_t(i1 - i0));
      for (int64_t i = i0; i < i1; ++i) {
        float gi = rng.value();
        switch (kind) {
          case kZero:
            gi = 0.f;
            rp[size_t(i)] = p.data()[i] = (i % 2) ? -0.f : 0.f;  // weight decay adds nothing
            if (!int8) rb[size_t(i)] = b.data()[i] = 0;
            break;
          case kTiny:
            gi = rng.subnormal();
            rp[size_t(i)] = p.data()[i] = rng.subnormal();
            if (!int8) rb[size_t(i)] = b.data()[i] = uint16_t(rng.next() & 0x807fu);
            break;
          case kNan:
            if (i == special) gi = std::numeric_limits<float>::quiet_NaN();
            break;
          case kInf:
            if (i == special) gi = (r >> 40) % 2 ? std::numeric_limits<float>::infinity()
                                                 : -std::numeric_limits<float>::infinity();
            break;
          case kHuge:
            gi = std::ldexp(gi, 125);  // |g| up to 2^127: the buffer overflows in some elements
            break;
          default:
            break;
        }
        g.data()[i] = gi;
      }
      if (int8 && kind == kZero) rsc[size_t(k)] = sc.data()[k] = (r >> 40) % 2 ? 0.f : -0.f;
      if (int8 && kind == kTiny) {
        rsc[size_t(k)] = sc.data()[k] = std::fabs(rng.subnormal());
        for (int64_t i = i0; i < i1; ++i) rq[size_t(i)] = q.data()[i] = rng.code();
      }
      if (int8 && kind == kNanScale) rsc[size_t(k)] = sc.data()[k] = std::nanf("");
    }
  }
  Q8Span q8_span() { return Q8Span{p.data(), q.data(), g.data(), sc.data(), n}; }
  Bf16MomSpan bf16_span() { return Bf16MomSpan{p.data(), b.data(), g.data(), n}; }

  /// The contract, one element (bf16) or one block (int8) at a time.
  void ref(const StepScalars<float>& s, uint32_t f) {
    if (!int8) {
      for (int64_t i = 0; i < n; ++i) {
        bf16mom_elem<AddFma>(rp.data(), (f & kMomentum) ? rb.data() : nullptr, g.data(),
                             static_cast<int>(i), s, f);
      }
      return;
    }
    const bool read_buf = (f & kMomentum) && !(f & kFirstStep);
    for (int64_t k = 0; k < q_blocks(n); ++k) {
      const int64_t i0 = k * kQBlock;
      const int m = static_cast<int>(std::min<int64_t>(kQBlock, n - i0));
      const float old = read_buf ? rsc[size_t(k)] : 0.f;
      float v[kQBlock];
      for (int j = 0; j < m; ++j) {
        v[j] = q8_elem<AddFma>(rp.data() + i0, rq.data() + i0, old, g.data() + i0, j, s, f);
      }
      if (!(f & kMomentum)) continue;
      uint32_t a = 0;
      for (int j = 0; j < m; ++j) a = std::max(a, q8_abs_bits(v[j]));
      const float ns = q8_scale(a);
      for (int j = 0; j < m; ++j) rq[size_t(i0 + j)] = q8_code(v[j], ns);
      rsc[size_t(k)] = ns;
    }
  }

  void check(const std::string& what) {
    auto fail = [&](const char* array, int64_t i, uint32_t got, uint32_t want) {
      char buf[320];
      std::snprintf(buf, sizeof buf, "%s: %s[%lld] of n=%lld: got 0x%08x want 0x%08x",
                    what.c_str(), array, (long long)i, (long long)n, got, want);
      report(buf);
    };
    for (int64_t i = 0; i < n; ++i) {
      if (fbits(p.data()[i]) != fbits(rp[size_t(i)])) {
        return fail("param", i, fbits(p.data()[i]), fbits(rp[size_t(i)]));
      }
    }
    for (int64_t i = 0; i < q.n; ++i) {
      if (q.data()[i] != rq[size_t(i)]) {
        return fail("codes", i, uint8_t(q.data()[i]), uint8_t(rq[size_t(i)]));
      }
    }
    for (int64_t k = 0; k < sc.n; ++k) {
      if (fbits(sc.data()[k]) != fbits(rsc[size_t(k)])) {
        return fail("scales", k, fbits(sc.data()[k]), fbits(rsc[size_t(k)]));
      }
    }
    for (int64_t i = 0; i < b.n; ++i) {
      if (b.data()[i] != rb[size_t(i)]) return fail("bf16 buffer", i, b.data()[i], rb[size_t(i)]);
    }
    if (!(p.canaries_intact() && g.canaries_intact() && q.canaries_intact() &&
          sc.canaries_intact() && b.canaries_intact())) {
      report(what + ": a canary was overwritten");
    }
    g_elements += uint64_t(n);
  }
};

struct Tiny1x1 {
  static constexpr int kTensors = 1, kBlocks = 1;
};
struct Tiny3x2 {
  static constexpr int kTensors = 3, kBlocks = 2;
};

std::vector<uint32_t> flag_sets() {
  std::vector<uint32_t> out;
  for (uint32_t f = 0; f <= kAllFlags; ++f) {
    if (flags_valid(f)) out.push_back(f);
  }
  return out;
}

/// Several spans of one buffer kind through the planner and kernel of Limits, three steps.
template <class Limits>
void run_case(bool int8, const std::vector<int64_t>& sizes,
              const std::vector<std::array<int, 3>>& offs, uint32_t flags, Order order,
              uint64_t seed, const char* limits) {
  Rng rng(seed);
  const Hyper h{0.01, 0.9, (flags & kNesterov) ? 0.0 : 0.1, 0.01};
  std::vector<std::unique_ptr<Span>> spans;
  for (size_t k = 0; k < sizes.size(); ++k) {
    spans.push_back(std::make_unique<Span>(sizes[k], int8, offs[k % offs.size()], rng));
  }
  const auto scalars = make_scalars<float>(h.lr, h.momentum, h.dampening, h.wd,
                                           [](double v) { return static_cast<float>(v); });
  for (int step = 0; step < 3; ++step) {
    // the first step with kFirstStep where the set has it, later ones without
    const uint32_t f = step == 0 ? flags : (flags & ~kFirstStep);
    for (auto& s : spans) {
      s->new_grad(rng);
      s->ref(scalars, f);
    }
    if (int8) {
      // the kernel gets every array; the planner must drop codes and scales without kMomentum
      std::vector<Q8Span> qs;
      for (auto& s : spans) qs.push_back(s->q8_span());
      cuda::plan_q8_list<Limits>(
          qs.data(), int64_t(qs.size()), scalars, f,
          [&](const cuda::Q8ListArgs<Limits::kTensors, Limits::kBlocks>& a, int blocks) {
            host_shim::host_launch_warps(cuda::sgd_q8_kernel<Limits::kTensors, Limits::kBlocks>,
                                         dim3(unsigned(blocks)), dim3(cuda::kThreads), order,
                                         seed + step, a);
          });
    } else {
      std::vector<Bf16MomSpan> bs;
      for (auto& s : spans) bs.push_back(s->bf16_span());
      cuda::plan_bf16mom_list<Limits>(
          bs.data(), int64_t(bs.size()), scalars, f,
          [&](const cuda::Bf16MomListArgs<Limits::kTensors, Limits::kBlocks>& a, int blocks) {
            host_shim::host_launch(cuda::sgd_bf16mom_kernel<Limits::kTensors, Limits::kBlocks>,
                                   dim3(unsigned(blocks)), dim3(cuda::kThreads), order,
                                   seed + step, a);
          });
    }
    for (size_t k = 0; k < spans.size(); ++k) {
      char what[200];
      std::snprintf(what, sizeof what, "%s %s flags=%u order=%s step=%d span %zu (n=%lld)",
                    int8 ? "int8" : "bf16", limits, f, host_shim::order_name(order), step, k,
                    (long long)spans[k]->n);
      spans[k]->check(what);
    }
  }
  ++g_cases;
}

void suite() {
  const std::vector<int64_t> small = {0, 1, 3, 7, 8, 97, 255, 256, 257, 1000};
  const int64_t mid = 65536 + 3, big = (int64_t{1} << 20) + 3;
  // element offsets of (param, grad, buffer: codes or bf16): all 16-byte aligned; all shifted
  // by 4 floats and 8 codes / bf16s (aligned again); by 3 (not); one array off; by 2 floats
  // (8-byte aligned only)
  const std::vector<std::array<int, 3>> offs = {{0, 0, 0}, {4, 4, 8}, {3, 3, 3},
                                                {0, 0, 1}, {0, 1, 0}, {2, 2, 2}};
  const Order orders[3] = {Order::kForward, Order::kReverse, Order::kShuffled};
  uint64_t seed = 1;
  for (const bool int8 : {true, false}) {
    for (uint32_t f : flag_sets()) {
      const Order o = orders[seed % 3];
      run_case<cuda::ListLimits32K>(int8, small, offs, f, o, ++seed, "32K");
      run_case<Tiny3x2>(int8, small, offs, f, o, ++seed, "tiny3x2");
      // a span over several chunks and launches, spans split over batches
      run_case<Tiny1x1>(int8, {mid, 5, 257}, offs, f, o, ++seed, "tiny1x1");
      if (!g_quick) {
        run_case<cuda::ListLimits4K>(int8, small, offs, f, o, ++seed, "4K");
        run_case<cuda::ListLimits32K>(int8, {mid, 1000, mid}, {{3, 3, 3}, {0, 0, 0}}, f, o,
                                      ++seed, "32K");
      }
    }
    // one span of 2^20 + 3 elements (17 chunks), aligned and not
    if (!g_quick) {
      run_case<cuda::ListLimits32K>(int8, {big}, {{0, 0, 0}}, kMomentum | kWeightDecay,
                                    Order::kShuffled, ++seed, "32K-big");
      run_case<cuda::ListLimits32K>(int8, {big}, {{4, 4, 1}}, kMomentum | kNesterov | kFirstStep,
                                    Order::kReverse, ++seed, "32K-big");
    }
    // many small spans: ListLimits32K batches end at 320 tensors, ListLimits4K at 36
    std::vector<int64_t> many;
    for (int k = 0; k < (g_quick ? 400 : 700); ++k) many.push_back((k * 37) % 300);
    run_case<cuda::ListLimits32K>(int8, many, offs, kMomentum | kWeightDecay, Order::kShuffled,
                                  ++seed, "32K-many");
    many.resize(100);
    run_case<cuda::ListLimits4K>(int8, many, offs, kMomentum | kFirstStep, Order::kForward, ++seed,
                                 "4K-many");
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
#ifdef HKT_PLANTED_BUG
  std::printf("planted bug: %s\n", HKT_PLANTED_BUG);
#endif
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") g_quick = true;
    else if (a == "--fail-fast") g_fail_fast = true;
    else {
      std::fprintf(stderr, "usage: %s [--quick] [--fail-fast]\n", argv[0]);
      return 2;
    }
  }
  if (flag_sets().size() != 20) {
    std::fprintf(stderr, "expected 20 valid flag sets, got %zu\n", flag_sets().size());
    return 1;
  }
  try {
    suite();
  } catch (const FailFast&) {
    std::printf("stopped at the first failing case (--fail-fast)\n");
  }
  std::printf("qmom cases checked: %llu (elements compared %llu, launches %llu)\n",
              (unsigned long long)g_cases, (unsigned long long)g_elements,
              (unsigned long long)host_shim::stats().launches);
  std::printf("mismatches: %llu\n", (unsigned long long)g_mismatches);
  return g_mismatches == 0 ? 0 : 1;
}
