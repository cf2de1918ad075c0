// test_kernel.cpp — the CPU kernel (csrc/cpu/momentum_cpu.h, no Python) against a naive
// reference written here, independently of sgd_math.h.
//
// Groups (argv[1], one ctest entry each):
//   fp32, fp64  one span per call: every valid flag set, sizes 0..2^20+3, 3 hyper-parameter sets,
//               several steps, both ISAs, start pointers 0..7 elements into the allocation.
//               Bit for bit (memcmp) with the reference; the whole allocation is compared, so
//               writes outside a span (guard elements) are caught too.
//   spans       100 spans of random sizes (some empty) packed with gaps into one allocation, one
//               call per step, 1 and 2 threads, both ISAs, fp32 and fp64.
//   narrow      bf16/fp16: their numerics depend on the element's position (torch's CPU kernels,
//               see momentum_cpu.cpp), so here only: default ISA == AVX2 ISA bit for bit, and
//               the exact position-free part: on the first step buf == g (or -g) in every span
//               element, nothing written between spans.
//   mutation    the reference with a planted bug must DISAGREE with the kernel (the suite can
//               fail), and the unmodified reference must agree on the same inputs.
//
// The reference is torch.optim.SGD's for-loop path for fp32/fp64 (docs/numerics.md):
//   g = -g (maximize); g = fma(p, wd, g) (wd != 0); buf = g on the first step, else
//   buf = fma(g, 1-d, buf*m); g = fma(buf, m, g) if nesterov else buf; p = fma(g, -lr, p),
// each scalar a Python double rounded once to T: float(1.0 - d), never 1.0f - float(d).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cpu/momentum_cpu.h"
#include "momentum_cuda/sgd_math.h"  // only to cross-check the flag bits restated below

namespace mc = momentum_cuda;
using mc_test::bits_of;
using mc_test::hex;

namespace {

// The StepFlags bits, restated so the reference does not depend on sgd_math.h.
constexpr uint32_t kMax = 1, kWd = 2, kMom = 4, kNes = 8, kFirst = 16;
static_assert(kMax == mc::kMaximize && kWd == mc::kWeightDecay && kMom == mc::kMomentum &&
                  kNes == mc::kNesterov && kFirst == mc::kFirstStep,
              "flag bits changed in sgd_math.h");

constexpr bool own_valid(uint32_t f) { return f < 32 && ((f & kMom) || !(f & (kNes | kFirst))); }

struct Hyper {
  double lr, momentum, dampening, weight_decay;
};
const Hyper kHypers[] = {
    {0.1, 0.9, 0.9, 1e-4},    // dampening 0.9: float(1.0 - 0.9) != 1.0f - 0.9f
    {0.01, 0.99, 0.0, 0.05},  // no dampening
    {1e-3, 0.5, 0.3, 0.3},
};

/// The 12 flag sets without kFirst. A run with kMom takes kFirst on its step 0 (torch's first
/// step), so the steps of all runs cover all 20 valid flag sets.
std::vector<uint32_t> base_flag_sets() {
  std::vector<uint32_t> v;
  for (uint32_t f = 0; f < 32; ++f)
    if (!(f & kFirst) && own_valid(f)) v.push_back(f);
  return v;
}
uint32_t step_flags(uint32_t base, int step) {
  return ((base & kMom) && step == 0) ? (base | kFirst) : base;
}
/// What the torch-facing code passes: momentum 0 without kMom, weight decay 0 without kWd.
mc::StepHyper step_hyper(const Hyper& h, uint32_t f) {
  return mc::StepHyper{h.lr, (f & kMom) ? h.momentum : 0.0, h.dampening,
                       (f & kWd) ? h.weight_decay : 0.0, f};
}
std::string flag_name(uint32_t f) {
  std::string s;
  if (f & kMax) s += "max|";
  if (f & kWd) s += "wd|";
  if (f & kMom) s += "mom|";
  if (f & kNes) s += "nes|";
  if (f & kFirst) s += "first|";
  return s.empty() ? "none" : s.substr(0, s.size() - 1);
}
const char* isa_name(mc::CpuIsa i) {
  return i == mc::CpuIsa::kAvx512 ? "avx512" : i == mc::CpuIsa::kAvx2 ? "avx2" : "default";
}
std::vector<mc::CpuIsa> isas() {
  std::vector<mc::CpuIsa> v{mc::CpuIsa::kDefault};
  if (mc::cpu_isa_available(mc::CpuIsa::kAvx2)) v.push_back(mc::CpuIsa::kAvx2);
  if (mc::cpu_isa_available(mc::CpuIsa::kAvx512)) v.push_back(mc::CpuIsa::kAvx512);
  return v;
}
template <class T>
const char* type_name() {
  if (std::is_same_v<T, float>) return "fp32";
  if (std::is_same_v<T, double>) return "fp64";
  if (std::is_same_v<T, c10::BFloat16>) return "bf16";
  return "fp16";
}

// ---- the naive reference -------------------------------------------------------------------
enum class Bug {
  kNone,
  kFloatOneMinusD,  // 1.0f - float(d) instead of float(1.0 - d)
  kMulAddBuf,       // buf = buf*m + g*(1-d): two roundings more than torch's fma
  kMulAddParam,     // p = p + g*(-lr)
  kOverrun,         // updates one element past the end of the span
};

template <class T>
void ref_step(T* p, T* buf, const T* g, int64_t n, const mc::StepHyper& h, Bug bug) {
  const uint32_t f = h.flags;
  const T neg_lr = static_cast<T>(-h.lr);
  const T wd = static_cast<T>(h.weight_decay);
  const T m = static_cast<T>(h.momentum);
  const T one_minus_d = bug == Bug::kFloatOneMinusD
                            ? static_cast<T>(1.0f - static_cast<float>(h.dampening))
                            : static_cast<T>(1.0 - h.dampening);
  if (bug == Bug::kOverrun) ++n;
  for (int64_t i = 0; i < n; ++i) {
    T gi = g[i];
    if (f & kMax) gi = -gi;
    if (f & kWd) gi = std::fma(p[i], wd, gi);
    if (f & kMom) {
      if (f & kFirst) {
        buf[i] = gi;
      } else if (bug == Bug::kMulAddBuf) {
        buf[i] = buf[i] * m + gi * one_minus_d;  // -ffp-contract=off keeps this two roundings
      } else {
        buf[i] = std::fma(gi, one_minus_d, buf[i] * m);
      }
      gi = (f & kNes) ? std::fma(buf[i], m, gi) : buf[i];
    }
    p[i] = bug == Bug::kMulAddParam ? p[i] + gi * neg_lr : std::fma(gi, neg_lr, p[i]);
  }
}

// ---- inputs ----------------------------------------------------------------------------------
/// Random, never zero: +-[1,2) * 2^[-8,4], full random mantissa, rounded once to T.
template <class T>
T rand_val(std::mt19937_64& r) {
  const int e = static_cast<int>(r() % 13) - 8;
  const double mant = 1.0 + static_cast<double>(r() >> 11) * 0x1p-53;
  const double v = std::ldexp(mant, e) * ((r() & 1) ? -1.0 : 1.0);
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return static_cast<T>(v);
  } else {
    return T(static_cast<float>(v));
  }
}
template <class T>
void fill(std::vector<T>& v, std::mt19937_64& r) {
  for (auto& x : v) x = rand_val<T>(r);
}

/// Where the spans of one call lie inside one allocation of `len` elements.
struct Layout {
  std::vector<int64_t> off, n;
  int64_t len = 0;
  std::string desc;
};
Layout one_span(int64_t n, int64_t offset) {
  return Layout{{offset}, {n}, offset + n + 8,
                "n=" + std::to_string(n) + " offset=" + std::to_string(offset)};
}
/// `count` spans of random sizes (some empty, two > 16384), packed after a start offset of
/// 1..7 elements with gaps of 0..3 elements between them.
Layout many_spans(int count, std::mt19937_64& r) {
  Layout L;
  int64_t pos = 1 + static_cast<int64_t>(r() % 7);
  for (int k = 0; k < count; ++k) {
    int64_t n;
    if (k % 10 == 3) n = 0;
    else if (k == 17 || k == 61) n = 16384 + static_cast<int64_t>(r() % 30000);
    else if (r() % 3 == 0) n = static_cast<int64_t>(r() % 40);
    else n = static_cast<int64_t>(r() % 3000);
    L.off.push_back(pos);
    L.n.push_back(n);
    pos += n + static_cast<int64_t>(r() % 4);
  }
  L.len = pos + 8;
  int64_t total = 0;
  for (auto n : L.n) total += n;
  L.desc = std::to_string(count) + " spans, " + std::to_string(total) + " elements";
  return L;
}

template <class T>
void kernel_step(std::vector<T>& p, std::vector<T>& b, const std::vector<T>& g, const Layout& L,
                 const mc::StepHyper& h) {
  std::vector<mc::Span> spans;
  for (size_t k = 0; k < L.off.size(); ++k) {
    // Span::grad is writable for the CUDA kernels' unscale; the CPU kernel only reads it.
    spans.push_back(mc::Span{p.data() + L.off[k], (h.flags & kMom) ? b.data() + L.off[k] : nullptr,
                             const_cast<T*>(g.data()) + L.off[k], L.n[k]});
  }
  mc::sgd_step_cpu<T>(spans.data(), static_cast<int64_t>(spans.size()), h);
}

/// Number of elements whose bits differ; `first` describes the first one.
template <class T>
int64_t count_diff(const std::vector<T>& a, const std::vector<T>& b, const char* what,
                   std::string* first) {
  if (std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0) return 0;
  int64_t d = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) {
      if (d++ == 0) {
        *first = std::string(what) + "[" + std::to_string(i) + "]: " + hex(bits_of(a[i])) +
                 " vs " + hex(bits_of(b[i]));
      }
    }
  }
  return d;
}

/// Runs `steps` steps of the kernel and of the reference on the same inputs; returns the number
/// of differing elements at the first step that differs (0: bitwise equal throughout).
template <class T>
int64_t kernel_vs_ref(const Layout& L, uint32_t base, const Hyper& hy, mc::CpuIsa isa, int steps,
                      uint64_t seed, Bug bug, std::string* where) {
  std::mt19937_64 r(seed);
  std::vector<T> kp(L.len), kb(L.len), g(L.len);
  fill(kp, r);
  fill(kb, r);
  std::vector<T> rp = kp, rb = kb;
  mc::set_cpu_isa(isa);
  for (int step = 0; step < steps; ++step) {
    fill(g, r);  // a new gradient every step
    const mc::StepHyper h = step_hyper(hy, step_flags(base, step));
    kernel_step(kp, kb, g, L, h);
    for (size_t k = 0; k < L.off.size(); ++k) {
      ref_step(rp.data() + L.off[k], (h.flags & kMom) ? rb.data() + L.off[k] : nullptr,
               g.data() + L.off[k], L.n[k], h, bug);
    }
    std::string first;
    int64_t d = count_diff(kp, rp, "param", &first);
    if (d == 0) d = count_diff(kb, rb, "buf", &first);
    if (d != 0) {
      *where = std::string(type_name<T>()) + " isa=" + isa_name(isa) + " " + L.desc +
               " flags=" + flag_name(h.flags) + " lr=" + std::to_string(hy.lr) + " m=" +
               std::to_string(hy.momentum) + " d=" + std::to_string(hy.dampening) + " wd=" +
               std::to_string(hy.weight_decay) + " step=" + std::to_string(step) + ": " +
               std::to_string(d) + " elements differ, first " + first + " (kernel vs reference)";
      return d;
    }
  }
  return 0;
}

const int64_t kSizes[] = {0, 1, 3, 7, 8, 9, 31, 32, 33, 97, 1025, (int64_t{1} << 20) + 3};

template <class T>
void group_single_span() {
  int cases = 0;
  for (mc::CpuIsa isa : isas()) {
    int hi = 0;
    for (const Hyper& hy : kHypers) {
      int fi = 0;
      for (uint32_t base : base_flag_sets()) {
        int si = 0;
        for (int64_t n : kSizes) {
          if (n > 100000 && hi != 0) continue;  // the 1M case with one hyper set (time)
          const int64_t offset = (si + fi + hi) % 8;
          std::string where;
          const int64_t d = kernel_vs_ref<T>(one_span(n, offset), base, hy, isa, 3,
                                             1000003u * (si + 1) + 101u * fi + hi, Bug::kNone,
                                             &where);
          CHECK(d == 0, where);
          ++cases, ++si;
        }
        ++fi;
      }
      ++hi;
    }
  }
  std::printf("%s: %d cases (isa x hyper x flags x size), 3 steps each, ISAs:", type_name<T>(),
              cases);
  for (auto i : isas()) std::printf(" %s", isa_name(i));
  std::printf("\n");
}

void group_spans() {
  // An empty call must be harmless.
  mc::sgd_step_cpu<float>(nullptr, 0, step_hyper(kHypers[0], kMom));
  CHECK(true, "");
  int cases = 0;
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    for (mc::CpuIsa isa : isas()) {
      int fi = 0;
      for (uint32_t base : base_flag_sets()) {
        std::mt19937_64 r(7919u * fi + threads);
        const Layout L = many_spans(100, r);
        const Hyper& hy = kHypers[fi % 3];
        std::string where;
        CHECK(kernel_vs_ref<float>(L, base, hy, isa, 3, 17 + fi, Bug::kNone, &where) == 0,
              where + " threads=" + std::to_string(threads));
        CHECK(kernel_vs_ref<double>(L, base, hy, isa, 3, 23 + fi, Bug::kNone, &where) == 0,
              where + " threads=" + std::to_string(threads));
        cases += 2;
        ++fi;
      }
    }
  }
  std::printf("spans: %d cases of 100 spans (threads 1,2 x ISAs x flags x fp32/fp64)\n", cases);
}

/// bf16/fp16: the default-ISA kernel, the AVX2 kernel and (where the CPU has it) the AVX-512
/// kernel give the same bits.
template <class T>
int narrow_isa_pair(const Layout& L, uint32_t base, const Hyper& hy, int threads, uint64_t seed) {
  at::set_num_threads(threads);
  std::mt19937_64 r(seed);
  std::vector<T> dp(L.len), db(L.len), g(L.len);
  fill(dp, r);
  fill(db, r);
  const std::vector<T> p0 = dp;
  const std::vector<T> b0 = db;
  std::vector<T> ap = dp, ab = db, xp = dp, xb = db;
  for (int step = 0; step < 3; ++step) {
    fill(g, r);
    const mc::StepHyper h = step_hyper(hy, step_flags(base, step));
    mc::set_cpu_isa(mc::CpuIsa::kDefault);
    kernel_step(dp, db, g, L, h);
    mc::set_cpu_isa(mc::CpuIsa::kAvx2);
    kernel_step(ap, ab, g, L, h);
    std::string first;
    int64_t d = count_diff(dp, ap, "param", &first);
    if (d == 0) d = count_diff(db, ab, "buf", &first);
    if (mc::cpu_isa_available(mc::CpuIsa::kAvx512)) {  // the AVX-512 clone: same bits again
      mc::set_cpu_isa(mc::CpuIsa::kAvx512);
      kernel_step(xp, xb, g, L, h);
      if (d == 0) d = count_diff(dp, xp, "param (avx512)", &first);
      if (d == 0) d = count_diff(db, xb, "buf (avx512)", &first);
    }
    if (d == 0 && step == 0 && (h.flags & kFirst) && !(h.flags & kWd)) {
      // Position-independent and exact: the first step copies the (negated) gradient into
      // buf in every span element and touches nothing between spans.
      std::vector<T> want = b0;
      for (size_t k = 0; k < L.off.size(); ++k)
        for (int64_t i = L.off[k]; i < L.off[k] + L.n[k]; ++i)
          want[i] = (h.flags & kMax) ? T(-static_cast<float>(g[i])) : g[i];
      d = count_diff(db, want, "buf (first step: buf = g)", &first);
    }
    CHECK(d == 0, std::string(type_name<T>()) + " " + L.desc + " flags=" + flag_name(h.flags) +
                      " threads=" + std::to_string(threads) + " step=" + std::to_string(step) +
                      ": " + std::to_string(d) + " elements differ, first " + first +
                      " (default vs avx2 vs avx512, or vs buf = g on the first step)");
    if (d != 0) return 1;
  }
  // Not a no-op (a single bf16 element may legitimately not move: lr*g below half an ulp).
  int64_t total = 0;
  for (auto n : L.n) total += n;
  if (total >= 32) {
    std::string first;
    CHECK(count_diff(dp, p0, "param", &first) > 0,
          std::string(type_name<T>()) + " " + L.desc + ": the kernel changed no parameter");
  }
  return 1;
}

template <class T>
int group_narrow_type() {
  int cases = 0;
  const int64_t sizes[] = {1, 7, 31, 32, 33, 97, 1025, 32768, 32769, 65536 + 33, (1 << 20) + 3};
  for (int threads : {1, 2}) {
    int fi = 0;
    for (uint32_t base : base_flag_sets()) {
      int si = 0;
      for (int64_t n : sizes) {
        // 2^20+3 (several torch chunks per thread count) for a third of the flag sets (time).
        if (n > 100000 && (threads != 2 || fi % 3 != 0)) continue;
        cases += narrow_isa_pair<T>(one_span(n, (si + fi) % 8), base, kHypers[(si + fi) % 3],
                                    threads, 31u * si + fi);
        ++si;
      }
      std::mt19937_64 r(101u * fi + threads);
      cases += narrow_isa_pair<T>(many_spans(100, r), base, kHypers[fi % 3], threads, 7u + fi);
      ++fi;
    }
  }
  return cases;
}

int group_narrow() {
  if (!mc::cpu_isa_available(mc::CpuIsa::kAvx2)) {
    std::printf("narrow: SKIPPED, this CPU has no AVX2+FMA+F16C (nothing to compare)\n");
    return 77;
  }
  const int b = group_narrow_type<c10::BFloat16>();
  const int h = group_narrow_type<c10::Half>();
  std::printf("narrow: %d bf16 + %d fp16 cases (threads 1,2 x flags x sizes/100 spans), "
              "3 steps each, default vs avx2\n", b, h);
  return 0;
}

/// A planted bug must be caught; the same inputs with the right reference must pass.
void group_mutation() {
  CHECK(static_cast<float>(1.0 - 0.9) != 1.0f - static_cast<float>(0.9),
        "precondition: float(1.0-0.9) == 1.0f-0.9f, the scalar bug would be invisible");
  struct Plant {
    Bug bug;
    uint32_t base;
    bool fp64;
    const char* name;
  };
  const Plant plants[] = {
      {Bug::kFloatOneMinusD, kMom, false, "fp32 1.0f-float(d) (momentum)"},
      {Bug::kFloatOneMinusD, kMom | kNes | kWd, false, "fp32 1.0f-float(d) (nesterov, wd)"},
      {Bug::kMulAddBuf, kMom, false, "fp32 buf*m + g*(1-d)"},
      {Bug::kMulAddBuf, kMom, true, "fp64 buf*m + g*(1-d)"},
      {Bug::kMulAddParam, 0, false, "fp32 p + g*(-lr)"},
      {Bug::kMulAddParam, kMax | kWd, true, "fp64 p + g*(-lr) (maximize, wd)"},
      {Bug::kOverrun, kMom, false, "fp32 one element past the span"},
      {Bug::kOverrun, 0, true, "fp64 one element past the span"},
  };
  int caught = 0, total = 0;
  for (mc::CpuIsa isa : isas()) {
    for (const Plant& pl : plants) {
      const Layout L = one_span(1025, 3);
      const Hyper& hy = kHypers[0];  // dampening 0.9
      std::string where, unused;
      const auto run = [&](Bug bug, std::string* w) {
        return pl.fp64 ? kernel_vs_ref<double>(L, pl.base, hy, isa, 3, 99, bug, w)
                       : kernel_vs_ref<float>(L, pl.base, hy, isa, 3, 99, bug, w);
      };
      const int64_t planted = run(pl.bug, &where);
      const int64_t control = run(Bug::kNone, &unused);
      CHECK(planted > 0, std::string("planted bug NOT detected: ") + pl.name + " isa=" +
                             isa_name(isa));
      CHECK(control == 0, std::string("control run differs: ") + unused);
      ++total;
      if (planted > 0) {
        ++caught;
        std::printf("mutation caught (%s, isa=%s): %s\n", pl.name, isa_name(isa), where.c_str());
      }
    }
  }
  std::printf("mutation: %d of %d planted bugs caught\n", caught, total);
}

}  // namespace

int main(int argc, char** argv) {
  int rc_narrow = 0;
  const int rc = mc_test::run_groups(
      argc, argv,
      {{"fp32", [] { group_single_span<float>(); }},
       {"fp64", [] { group_single_span<double>(); }},
       {"spans", [] { group_spans(); }},
       {"narrow", [&] { rc_narrow = group_narrow(); if (rc_narrow) CHECK(true, ""); }},
       {"mutation", [] { group_mutation(); }}});
  return rc == 0 && rc_narrow == 77 ? 77 : rc;
}
