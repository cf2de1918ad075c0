// host_qmom_test.cpp — runs the momentum_dtype kernels (csrc/cuda/qmom_kernel.cuh) and the fp16
// master-weights kernel (csrc/cuda/fp16_master_kernel.cuh) on the host through host_shim.h and
// checks them BITWISE against the naive loops of their contracts
// (csrc/include/momentum_cuda/momentum_dtype.h, fp16_master.h), written here one element and
// one block at a time as the contracts state them:
//   bf16 buffers: bf16mom_elem on every element in turn;
//   int8 buffers: per block of kQBlock elements (counted from each span's element 0, the last
//   partial), q8_elem on each element (the old scale read unless first step), then the absmax
//   as a plain max of q8_abs_bits, q8_scale, q8_code on each element;
//   fp16 master: fp16_master_elem on every element in turn; besides, every parameter must be
//   its new master rounded by the compiler's own float -> _Float16 conversion (NaN: any NaN),
//   which the contract's conversion is not checked against otherwise.
// The bf16 kernel runs under host_launch (threads one after the other); the int8 kernel under
// host_launch_warps (its warp shuffles run in lock step).
//
// Cases: all 20 flag sets; sizes 0, 1, 3, 7, 8, 97, 255, 256, 257, 1000, 2^16 + 3 (and one
// 2^20 + 3); element offsets that make the vector path run, not run, or run for some arrays only;
// ListLimits32K, ListLimits4K and tiny batch limits, and hundreds of small spans (several
// launches, spans split over launches); three steps and a fourth that GradScaler's found_inf (1
// or NaN) skips (found_inf_of: nothing may change) (the first one with kFirstStep where the set
// has it; its codes and scales are garbage, NaN scales included); forward, reverse and shuffled
// warp and lane orders. Each step gives every int8 block a kind: random, all zero (old scale 0),
// subnormal values (old scale subnormal), a NaN or an infinity in the gradient, gradients near
// FLT_MAX (the buffer overflows), or an old NaN scale. Without kMomentum the codes, scales and
// bf16 buffers must stay as they were; memory around every array is filled with canaries and
// checked after each step.
// fp16 master cases: the same flag sets, sizes 0, 1, 3, 7, 8, 9, 97, 1000, 2^16 + 3, element
// offsets per array (param, master, grad, buffer) that make each one misaligned alone, batch
// limits and several steps as above; each group of 64 elements gets a kind: random, masters
// around fp16's largest value 65504 (the parameter inf from 65520 on, the master finite),
// masters and gradients in fp16's subnormal range, a NaN or an infinity in the gradient, all
// zero. The parameter is garbage before every step (it is written, never read).
//
// Build: g++ <csrc/build_flags.json's "cxx"> -O1 -I tests/cuda -I csrc/cuda -I csrc
//        -I csrc/include -I <cuda>/include tests/cuda/host_qmom_test.cpp
//        (tests/test_cuda_host.py does this, also under ASan+UBSan and with planted bugs)
//        (-DHQT_ONLY_FP16M: only the fp16 master cases, a faster build for planted bugs)
// Usage: host_qmom_test [--quick] [--fail-fast] [--only qmom|fp16m]; exit status 0 iff
//        everything run matched.
#include "host_shim.h"

#include "fp16_master_kernel.cuh"
#include "host_elementwise.h"
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
std::string g_only;  // "", "qmom" or "fp16m"
uint64_t g_cases = 0, g_elements = 0, g_mismatches = 0;
uint64_t g_f16m_cases = 0, g_f16m_elements = 0;
// fp16 master coverage: parameters inf with a finite master, fp16 subnormal parameters, NaNs
uint64_t g_f16m_inf = 0, g_f16m_sub = 0, g_f16m_nan = 0;
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

/// Several spans of one buffer kind through the planner and kernel of Limits, kSteps steps (the
/// last skipped by found_inf).
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
  for (int step = 0; step < kSteps; ++step) {
    // the first step with kFirstStep where the set has it, later ones without
    const uint32_t f = step == 0 ? flags : (flags & ~kFirstStep);
    const float* found_inf = found_inf_of(step, seed);
    const DeviceHyper dh = device_hyper_of(step, seed, h);
    const auto rs = dh.zeroed ? make_scalars<float>(h.lr, 0.0, h.dampening, 0.0,
                                                    [](double v) { return static_cast<float>(v); })
                              : scalars;
    for (auto& s : spans) {
      s->new_grad(rng);
      if (!cuda::amp_skips(found_inf)) s->ref(rs, dh.ref_flags(f));
    }
    if (int8) {
      // the kernel gets every array; the planner must drop codes and scales without kMomentum
      std::vector<Q8Span> qs;
      for (auto& s : spans) qs.push_back(s->q8_span());
      cuda::plan_q8_list<Limits>(
          qs.data(), int64_t(qs.size()), dh.scalars(scalars), f, found_inf, dh.ptrs(),
          [&](const cuda::Q8ListArgs<Limits::kTensors, Limits::kBlocks>& a, int blocks) {
            host_shim::host_launch_warps(cuda::sgd_q8_kernel<Limits::kTensors, Limits::kBlocks>,
                                         dim3(unsigned(blocks)), dim3(cuda::kThreads), order,
                                         seed + step, a);
          });
    } else {
      std::vector<Bf16MomSpan> bs;
      for (auto& s : spans) bs.push_back(s->bf16_span());
      host_elementwise_step<cuda::Bf16MomMode, Limits>(bs, scalars, f, order, seed + step,
                                                       found_inf, dh);
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

#ifdef HQT_ONLY_FP16M
void suite() {}  // the momentum_dtype cases not compiled in (builds with a planted fp16 master bug)
#else
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
#endif  // HQT_ONLY_FP16M

// ---- fp16 master weights (fp16_master_kernel.cuh) ----------------------------------------------

/// The kinds of 64-element groups an fp16 master step is given (F16mSpan::new_grad).
enum F16mKind { kFmRandom, kFmEdge, kFmSub, kFmNan, kFmInf, kFmZero, kFmKinds };
constexpr int64_t kFmGroup = 64;

uint16_t h16(float f) { return mc_float_to_fp16_bits(f); }

/// The compiler's own rounding of f to fp16 (RNE), independent of the contract's.
uint16_t f16_independent(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
bool f16_is_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x03ffu) != 0; }

/// One fp16 master span: the kernel's arrays and the reference's copies.
struct F16mSpan {
  int64_t n;
  Guarded<uint16_t> p, g;
  Guarded<float> m, b;
  std::vector<uint16_t> rp;
  std::vector<float> rm, rb;
  /// off: element offsets of (param, master, grad, buffer)
  F16mSpan(int64_t n_, const std::array<int, 4>& off, Rng& rng)
      : n(n_), p(n_, off[0]), g(n_, off[2]), m(n_, off[1]), b(n_, off[3]), rp(size_t(n_)),
        rm(size_t(n_)), rb(size_t(n_)) {
    for (int64_t i = 0; i < n; ++i) {
      rm[size_t(i)] = m.data()[i] = rng.value() * 4.f;
      // what a first step finds in the buffer: values, and one in 16 random bits (NaN and
      // inf among them; more would leave most masters huge or NaN after a step that reads it)
      const uint64_t r = rng.next();
      rb[size_t(i)] = b.data()[i] = r % 16 == 0 ? bitsf(static_cast<uint32_t>(r >> 32))
                                                : rng.value();
    }
  }
  /// New gradients and a garbage parameter; every group of kFmGroup elements gets a kind. The
  /// master and buffer are changed where a kind needs it, in both copies alike.
  void new_grad(Rng& rng) {
    for (int64_t i = 0; i < n; ++i) rp[size_t(i)] = p.data()[i] = uint16_t(rng.next());
    for (int64_t i0 = 0; i0 < n; i0 += kFmGroup) {
      const int64_t i1 = std::min<int64_t>(n, i0 + kFmGroup);
      const uint64_t r = rng.next();
      const F16mKind kind = r % 3 != 0 ? kFmRandom : static_cast<F16mKind>((r >> 8) % kFmKinds);
      const int64_t special = i0 + static_cast<int64_t>((r >> 16) % uint64_t(i1 - i0));
      for (int64_t i = i0; i < i1; ++i) {
        uint16_t gi = h16(rng.value());
        const uint64_t q = rng.next();
        switch (kind) {
          case kFmEdge: {
            // |master| in [65504 - 512, 65504 + 512) (65520 and up round to inf), gradients up
            // to 2^15 (lr * g crosses it); now and then a master far beyond fp16's range
            const int d = static_cast<int>(q % 2048) - 1024;
            const float edge = 65504.f + static_cast<float>(d) / 2.f;
            float mi = (q >> 11) % 16 == 0 ? 1e30f : edge;
            mi = (q >> 15) % 2 ? -mi : mi;
            rm[size_t(i)] = m.data()[i] = mi;
            gi = h16(std::ldexp(rng.value(), 12));
            break;
          }
          case kFmSub:
            // masters below 2^-14 (fp16 subnormals or less), subnormal fp16 gradients
            rm[size_t(i)] = m.data()[i] = std::ldexp(rng.value(), -16 - static_cast<int>(q % 12));
            gi = static_cast<uint16_t>((q >> 8) & 0x83ffu);
            rb[size_t(i)] = b.data()[i] = std::ldexp(rng.value(), -20);
            break;
          case kFmNan:
            if (i == special) gi = (q % 2) ? 0x7e00u : 0xfe01u;
            break;
          case kFmInf:
            if (i == special) gi = (q % 2) ? 0x7c00u : 0xfc00u;
            break;
          case kFmZero:
            gi = (q % 2) ? 0x8000u : 0u;
            rm[size_t(i)] = m.data()[i] = (q >> 1) % 2 ? -0.f : 0.f;
            rb[size_t(i)] = b.data()[i] = 0.f;
            break;
          default:
            break;
        }
        g.data()[i] = gi;
      }
    }
  }
  Fp16MasterSpan span() { return Fp16MasterSpan{p.data(), m.data(), b.data(), g.data(), n}; }

  /// The contract, one element at a time.
  void ref(const StepScalars<float>& s, uint32_t f) {
    for (int64_t i = 0; i < n; ++i) {
      fp16_master_elem<AddFma>(rp.data(), rm.data(), (f & kMomentum) ? rb.data() : nullptr,
                               g.data(), static_cast<int>(i), s, f);
    }
  }

  /// stepped: the step ran (a skipped one leaves new_grad's garbage parameter, no rounding).
  void check(const std::string& what, bool stepped) {
    auto fail = [&](const char* array, int64_t i, uint32_t got, uint32_t want) {
      char buf[320];
      std::snprintf(buf, sizeof buf, "%s: %s[%lld] of n=%lld: got 0x%08x want 0x%08x",
                    what.c_str(), array, (long long)i, (long long)n, got, want);
      report(buf);
    };
    for (int64_t i = 0; i < n; ++i) {
      if (p.data()[i] != rp[size_t(i)]) return fail("param", i, p.data()[i], rp[size_t(i)]);
      if (!stepped) continue;
      const uint16_t want = f16_independent(m.data()[i]);
      if (f16_is_nan(want) ? !f16_is_nan(p.data()[i]) : p.data()[i] != want) {
        return fail("param (not the new master's rounding)", i, p.data()[i], want);
      }
    }
    for (int64_t i = 0; stepped && i < n; ++i) {
      const uint16_t h = p.data()[i];
      g_f16m_inf += (h & 0x7fffu) == 0x7c00u && std::isfinite(m.data()[i]);
      g_f16m_sub += (h & 0x7c00u) == 0 && (h & 0x03ffu) != 0;
      g_f16m_nan += f16_is_nan(h);
    }
    for (int64_t i = 0; i < n; ++i) {
      if (fbits(m.data()[i]) != fbits(rm[size_t(i)])) {
        return fail("master", i, fbits(m.data()[i]), fbits(rm[size_t(i)]));
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      if (fbits(b.data()[i]) != fbits(rb[size_t(i)])) {
        return fail("buffer", i, fbits(b.data()[i]), fbits(rb[size_t(i)]));
      }
    }
    if (!(p.canaries_intact() && g.canaries_intact() && m.canaries_intact() &&
          b.canaries_intact())) {
      report(what + ": a canary was overwritten");
    }
    g_f16m_elements += uint64_t(n);
  }
};

/// Several fp16 master spans through plan_elementwise<Fp16MasterMode> and the kernel of Limits,
/// kSteps steps (the first with kFirstStep where the set has it, the last skipped by found_inf).
template <class Limits>
void run_f16m_case(const std::vector<int64_t>& sizes, const std::vector<std::array<int, 4>>& offs,
                   uint32_t flags, Order order, uint64_t seed, const char* limits) {
  Rng rng(seed);
  const Hyper h{0.01, 0.9, (flags & kNesterov) ? 0.0 : 0.1, 0.01};
  std::vector<std::unique_ptr<F16mSpan>> spans;
  for (size_t k = 0; k < sizes.size(); ++k) {
    spans.push_back(std::make_unique<F16mSpan>(sizes[k], offs[k % offs.size()], rng));
  }
  const auto scalars = make_scalars<float>(h.lr, h.momentum, h.dampening, h.wd,
                                           [](double v) { return static_cast<float>(v); });
  for (int step = 0; step < kSteps; ++step) {
    const uint32_t f = step == 0 ? flags : (flags & ~kFirstStep);
    const float* found_inf = found_inf_of(step, seed);
    const DeviceHyper dh = device_hyper_of(step, seed, h);
    const auto rs = dh.zeroed ? make_scalars<float>(h.lr, 0.0, h.dampening, 0.0,
                                                    [](double v) { return static_cast<float>(v); })
                              : scalars;
    for (auto& s : spans) {
      s->new_grad(rng);
      if (!cuda::amp_skips(found_inf)) s->ref(rs, dh.ref_flags(f));
    }
    // the kernel gets every buffer; the planner must drop them without kMomentum
    std::vector<Fp16MasterSpan> fs;
    for (auto& s : spans) fs.push_back(s->span());
    host_elementwise_step<cuda::Fp16MasterMode, Limits>(fs, scalars, f, order, seed + step,
                                                        found_inf, dh);
    for (size_t k = 0; k < spans.size(); ++k) {
      char what[200];
      std::snprintf(what, sizeof what, "fp16m %s flags=%u order=%s step=%d span %zu (n=%lld)",
                    limits, f, host_shim::order_name(order), step, k, (long long)spans[k]->n);
      spans[k]->check(what, !cuda::amp_skips(found_inf));
    }
  }
  ++g_f16m_cases;
}

void f16m_suite() {
  const std::vector<int64_t> small = {0, 1, 3, 7, 8, 9, 97, 1000};
  const int64_t mid = 65536 + 3;
  // element offsets of (param, master, grad, buffer): all 16-byte aligned; shifted by 8 fp16
  // and 4 fp32 (aligned again); all by 3 (not); each array off alone (the fp16 grad by 4: 8-byte
  // aligned only)
  const std::vector<std::array<int, 4>> offs = {{0, 0, 0, 0}, {8, 4, 8, 4}, {3, 3, 3, 3},
                                                {1, 0, 0, 0}, {0, 1, 0, 0}, {0, 0, 4, 0},
                                                {0, 0, 0, 2}};
  const Order orders[3] = {Order::kForward, Order::kReverse, Order::kShuffled};
  uint64_t seed = 1000;
  for (uint32_t f : flag_sets()) {
    const Order o = orders[seed % 3];
    run_f16m_case<cuda::ListLimits32K>(small, offs, f, o, ++seed, "32K");
    run_f16m_case<Tiny3x2>(small, offs, f, o, ++seed, "tiny3x2");
    // a span over two chunks and launches, spans split over batches
    run_f16m_case<Tiny1x1>({mid, 5, 9}, offs, f, o, ++seed, "tiny1x1");
    if (!g_quick) {
      run_f16m_case<cuda::ListLimits4K>(small, offs, f, o, ++seed, "4K");
      run_f16m_case<cuda::ListLimits32K>({mid, 1000, mid}, {{3, 3, 3, 3}, {0, 0, 0, 0}}, f, o,
                                         ++seed, "32K");
    }
  }
  // many small spans: ListLimits32K batches end at 320 tensors, ListLimits4K at 36
  std::vector<int64_t> many;
  for (int k = 0; k < (g_quick ? 400 : 700); ++k) many.push_back((k * 37) % 300);
  run_f16m_case<cuda::ListLimits32K>(many, offs, kMomentum | kWeightDecay, Order::kShuffled,
                                     ++seed, "32K-many");
  many.resize(100);
  run_f16m_case<cuda::ListLimits4K>(many, offs, kMomentum | kFirstStep, Order::kForward, ++seed,
                                    "4K-many");
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
    else if (a == "--only" && i + 1 < argc && (std::string(argv[i + 1]) == "qmom" ||
                                               std::string(argv[i + 1]) == "fp16m")) {
      g_only = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--fail-fast] [--only qmom|fp16m]\n", argv[0]);
      return 2;
    }
  }
  if (flag_sets().size() != 20) {
    std::fprintf(stderr, "expected 20 valid flag sets, got %zu\n", flag_sets().size());
    return 1;
  }
  try {
    if (g_only != "fp16m") suite();
    if (g_only != "qmom") f16m_suite();
  } catch (const FailFast&) {
    std::printf("stopped at the first failing case (--fail-fast)\n");
  }
  std::printf("qmom cases checked: %llu (elements compared %llu, launches %llu)\n",
              (unsigned long long)g_cases, (unsigned long long)g_elements,
              (unsigned long long)host_shim::stats().launches);
  std::printf("fp16m cases checked: %llu (elements compared %llu)\n",
              (unsigned long long)g_f16m_cases, (unsigned long long)g_f16m_elements);
  std::printf("fp16m params seen: %llu inf with a finite master, %llu subnormal, %llu NaN\n",
              (unsigned long long)g_f16m_inf, (unsigned long long)g_f16m_sub,
              (unsigned long long)g_f16m_nan);
  std::printf("mismatches: %llu\n", (unsigned long long)g_mismatches);
  return g_mismatches == 0 ? 0 : 1;
}
