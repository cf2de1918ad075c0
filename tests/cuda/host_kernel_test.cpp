// host_kernel_test.cpp — runs the CUDA kernels of csrc/cuda/sgd_kernel.cuh on the host (through
// host_shim.h) and checks them BITWISE against a naive per-element reference written here,
// independently of csrc (its own bf16/fp16 rounding, its own scalar casts).
//
// Contract checked (CUDA path), per element, in opmath O (float for fp32/bf16/fp16, double for
// fp64), scalars = O(double) (NOT narrowed to bf16/fp16), r(x) = narrow to storage with round to
// nearest even and widen back (identity for fp32/fp64):
//   g = -g (maximize); g = r(fma(p, wd, g)) (weight decay);
//   buf = g (first step) else buf = r(fma(g, 1-d, r(buf*m)));
//   g = r(fma(buf, m, g)) (nesterov) else g = buf (momentum);  p = r(fma(g, -lr, p)).
//
// Cases: flat kernel over sizes 0..1025 and 2^20+3, element offsets 0..7 for p, buf and grad
// (equal and different misalignments), several grids and thread orders, all 20 valid flag sets,
// several steps, every dtype; the multi-tensor kernel through plan_list with ListLimits4K,
// ListLimits32K and tiny limits (many launches, spans split over launches). Memory around every
// span is filled with canaries and checked after each step. GradScaler in the kernel (amp_suite):
// grad_scale given or not (powers of two, 1000, 3, 1), found_inf 0 and 1, flat and list kernels,
// the unscaled gradients compared too; lr, momentum, dampening and weight_decay each a host
// scalar or read from device memory (HyperPtrs, fp32 and fp64; a device momentum or
// weight_decay of 0 skips its ops); the first step decided by the host or by AmpPtrs::first_step
// in device memory. The launcher's own grid
// (cuda::flat_grid) is checked by flat_grid_test.cpp.
//
// Build: g++ <csrc/build_flags.json's "cxx"> -O1 -I csrc/cuda -I csrc -I csrc/include
//        -I <cuda>/include -I tests/cuda tests/cuda/host_kernel_test.cpp
//        [-DHKT_DTYPES=mask: 1 fp32, 2 fp64, 4 bf16, 8 fp16; default all]
//        (tests/test_cuda_host.py does this, also under ASan+UBSan and with planted bugs)
// Usage: host_kernel_test [--quick] [--fail-fast] [--verbose]
//   --quick     fewer cases (for the sanitizer build)
//   --fail-fast stop at the first mismatch (for the planted-bug builds)
// Exit status: 0 if everything matched, 1 on any mismatch, 2 on a usage error.
#include "host_shim.h"

#include "sgd_kernel.cuh"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

using namespace momentum_cuda;
using momentum_cuda::cuda::bf16_t;
using momentum_cuda::cuda::fp16_t;
using host_shim::Order;

#ifndef HKT_DTYPES
#define HKT_DTYPES 15
#endif

namespace {

// ---- options and bookkeeping ----------------------------------------------------------------
bool g_quick = false, g_fail_fast = false, g_verbose = false;
uint64_t g_cases = 0, g_steps = 0, g_elements = 0, g_mismatches = 0, g_failed_cases = 0;
int g_reported = 0;

struct FailFast {};  // thrown after the first failure with --fail-fast

void report(const std::string& msg) {
  if (g_reported < 25) std::fprintf(stderr, "MISMATCH %s\n", msg.c_str());
  ++g_reported;
}

// ---- independent reference types --------------------------------------------------------------
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

template <class T>
struct Ref;
template <>
struct Ref<float> {
  using O = float;
  static const char* name() { return "fp32"; }
  static O widen(float x) { return x; }
  static float narrow(O x) { return x; }
};
template <>
struct Ref<double> {
  using O = double;
  static const char* name() { return "fp64"; }
  static O widen(double x) { return x; }
  static double narrow(O x) { return x; }
};
template <>
struct Ref<bf16_t> {
  using O = float;
  static const char* name() { return "bf16"; }
  static O widen(bf16_t x) { return bitsf(uint32_t{x.x} << 16); }
  static bf16_t narrow(O f) {  // round half to even on the 16 dropped bits
    const uint32_t u = fbits(f);
    if (std::isnan(f)) return bf16_t{0x7fc0};
    uint32_t hi = u >> 16;
    const uint32_t lo = u & 0xffffu;
    if (lo > 0x8000u || (lo == 0x8000u && (hi & 1u))) ++hi;
    return bf16_t{static_cast<uint16_t>(hi)};
  }
};
template <>
struct Ref<fp16_t> {  // the compiler's own IEEE binary16 (_Float16: RNE conversions)
  using O = float;
  static const char* name() { return "fp16"; }
  static O widen(fp16_t x) {
    _Float16 h;
    std::memcpy(&h, &x.x, 2);
    return static_cast<float>(h);
  }
  static fp16_t narrow(O f) {
    const _Float16 h = static_cast<_Float16>(f);
    fp16_t out;
    std::memcpy(&out.x, &h, 2);
    return out;
  }
};

template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

struct Hyper {
  double lr, momentum, dampening, wd;
  bool momentum_dev = false;   ///< momentum in device memory: buf.mul_(m) takes it as T first
  bool dampening_f32 = false;  ///< dampening an fp32 tensor: 1 - d computed in fp32
};
const Hyper kHypers[] = {
    {0.1, 0.9, 0.0, 1e-2},
    {0.01, 0.7, 0.3, 0.05},  // float(1 - 0.3) != 1.0f - 0.3f
    {1.3, 0.99, 0.1, 3e-4},
};

/// One element of the reference step (naive, straight from the contract).
template <class T>
void ref_step(T& p, T& b, T g_in, const Hyper& h, uint32_t flags) {
  using R = Ref<T>;
  using O = typename R::O;
  const O neg_lr = static_cast<O>(-h.lr), wd = static_cast<O>(h.wd);
  const O m = static_cast<O>(h.momentum);
  const O m_mul = h.momentum_dev ? R::widen(R::narrow(m)) : m;
  const O omd = static_cast<O>(h.dampening_f32 ? static_cast<double>(1.0f - static_cast<float>(h.dampening))
                                               : 1.0 - h.dampening);
  auto r = [](O x) { return R::widen(R::narrow(x)); };
  O g = R::widen(g_in);
  const O pw = R::widen(p);
  if (flags & kMaximize) g = -g;
  if (flags & kWeightDecay) g = r(std::fma(pw, wd, g));
  if (flags & kMomentum) {
    O buf;
    if (flags & kFirstStep) {
      buf = g;
    } else {
      const O prod = R::widen(b) * m_mul;  // -ffp-contract=off: a correctly rounded product
      buf = r(std::fma(g, omd, r(prod)));
    }
    b = R::narrow(buf);
    g = (flags & kNesterov) ? r(std::fma(buf, m, g)) : buf;
  }
  p = R::narrow(std::fma(g, neg_lr, pw));
}

/// The scalars as the real launcher (csrc/cuda/sgd_cuda.cu) builds them.
template <class T>
cuda::CudaScalars<T> launcher_scalars(const Hyper& h) {
  using O = typename cuda::Storage<T>::opmath;
  return make_scalars<O>(h.lr, h.momentum, h.dampening, h.wd,
                         [](double v) { return static_cast<O>(v); });
}

// ---- random values ----------------------------------------------------------------------------
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x1234567ull) {}
  uint64_t next() {  // splitmix64
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) { return next() % n; }
  /// Nonzero, random mantissa, magnitude in [2^-4, 4), random sign.
  double value() {
    const uint64_t r = next();
    const double mant = 1.0 + static_cast<double>(r & 0xFFFFFFFFFFFFFull) / 4503599627370496.0;
    const double v = std::ldexp(mant, static_cast<int>((r >> 52) % 6) - 4);
    return (r >> 63) ? -v : v;
  }
};

template <class T>
T make_value(Rng& rng) {
  using R = Ref<T>;
  using O = typename R::O;
  T v = R::narrow(static_cast<O>(rng.value()));
  return v;
}

// ---- guarded arrays -----------------------------------------------------------------------------
// [lead canaries | offset canaries | n elements | trail canaries], 64-byte aligned base. Under
// ASan the trailing canaries are left out so that an access one past the end hits the redzone.
#if defined(__SANITIZE_ADDRESS__)
constexpr int64_t kTrail = 0;
#else
constexpr int64_t kTrail = 16;
#endif
constexpr int64_t kLead = 16;

template <class T>
struct Guarded {
  T* base = nullptr;
  int64_t total = 0, start = 0, n = 0;
  std::vector<T> canary;  // expected content of the allocation outside [start, start+n)
  Guarded() = default;
  Guarded(int64_t n_, int offset, Rng& rng) : start(kLead + offset), n(n_) {
    total = start + n + kTrail;
    base = static_cast<T*>(::operator new(sizeof(T) * static_cast<size_t>(total),
                                          std::align_val_t(64)));
    canary.resize(static_cast<size_t>(total - n));
    for (int64_t i = 0; i < total - n; ++i) {
      T c;  // a recognisable pattern (byte-wise, NaN-free for floats)
      unsigned char bytes[sizeof(T)];
      for (size_t k = 0; k < sizeof(T); ++k) bytes[k] = static_cast<unsigned char>(0x3A + (i * 7 + k) % 13);
      std::memcpy(&c, bytes, sizeof(T));
      canary[static_cast<size_t>(i)] = c;
      base[i < start ? i : i + n] = c;
    }
    for (int64_t i = 0; i < n; ++i) base[start + i] = make_value<T>(rng);
  }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  ~Guarded() {
    if (base) ::operator delete(base, std::align_val_t(64));
  }
  T* data() { return base + start; }
  T& operator[](int64_t i) { return base[start + i]; }
  /// Index of the first canary that changed, or -1.
  int64_t broken_canary() const {
    for (int64_t i = 0; i < total - n; ++i) {
      const int64_t at = i < start ? i : i + n;
      if (!same_bits(base[at], canary[static_cast<size_t>(i)])) return at - start;
    }
    return -1;
  }
};

// ---- one span: its arrays, its reference, its check ------------------------------------------
template <class T>
struct SpanData {
  int64_t n;
  Guarded<T> p, b, g;
  std::vector<T> rp, rb;  // the reference's p and buf
  bool null_buf;
  SpanData(int64_t n_, int op, int ob, int og, bool null_buf_, Rng& rng)
      : n(n_), p(n_, op, rng), b(n_, ob, rng), g(n_, og, rng), null_buf(null_buf_) {
    rp.assign(p.data(), p.data() + n);
    rb.assign(b.data(), b.data() + n);
  }
  T* buf_ptr() { return null_buf ? nullptr : b.data(); }
  void new_grad(Rng& rng) {
    for (int64_t i = 0; i < n; ++i) g[i] = make_value<T>(rng);
  }
  void ref(const Hyper& h, uint32_t flags) {
    for (int64_t i = 0; i < n; ++i) ref_step(rp[static_cast<size_t>(i)], rb[static_cast<size_t>(i)], g[i], h, flags);
  }
  /// Compares everything; returns the number of problems found (reported with `what`).
  uint64_t check(const std::string& what) {
    uint64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bool okp = same_bits(p[i], rp[static_cast<size_t>(i)]);
      const bool okb = same_bits(b[i], rb[static_cast<size_t>(i)]);
      if (!okp || !okb) {
        if (bad == 0) {
          char buf[256];
          std::snprintf(buf, sizeof buf, "%s: element %lld of %lld: param %s, buf %s (got p=%.9g want %.9g)",
                        what.c_str(), static_cast<long long>(i), static_cast<long long>(n),
                        okp ? "ok" : "WRONG", okb ? "ok" : "WRONG",
                        static_cast<double>(Ref<T>::widen(p[i])),
                        static_cast<double>(Ref<T>::widen(rp[static_cast<size_t>(i)])));
          report(buf);
        }
        ++bad;
      }
    }
    const char* names[3] = {"param", "buf", "grad"};
    const Guarded<T>* arrs[3] = {&p, &b, &g};
    for (int k = 0; k < 3; ++k) {
      const int64_t at = arrs[k]->broken_canary();
      if (at != -1) {
        report(what + ": canary of " + names[k] + " overwritten at index " + std::to_string(at));
        ++bad;
      }
    }
    g_elements += static_cast<uint64_t>(n);
    return bad;
  }
};

// ---- flat kernel cases -----------------------------------------------------------------------
enum GridKind { kOneBlock, kLauncher, kManyBlocks, kOversubscribed, kSmallStride, kGridKinds };
const char* grid_name(int k) {
  static const char* names[] = {"one-block", "launcher", "many-blocks", "oversubscribed", "small-stride"};
  return names[k];
}

template <class T>
void grid_for(int kind, int64_t n, dim3& grid, dim3& block) {
  int64_t blocks = 1, threads = 256;
  switch (kind) {
    case kOneBlock: blocks = 1; threads = 256; break;
    case kLauncher:  // sgd_cuda.cu's grid on an H200 (132 SMs, 6 blocks an SM by registers)
      blocks = cuda::flat_grid<T>(n, 6, 132);
      threads = cuda::kThreads;
      break;
    case kManyBlocks: blocks = std::min<int64_t>(n / 8 + 2, 4096); threads = 32; break;
    case kOversubscribed: blocks = n / 128 + 2; threads = 256; break;  // threads > n + 256
    case kSmallStride: blocks = 3; threads = 96; break;
  }
  if (blocks < 1) blocks = 1;
  grid = dim3(static_cast<unsigned>(blocks));
  block = dim3(static_cast<unsigned>(threads));
}

std::vector<uint32_t> valid_flag_sets() {
  std::vector<uint32_t> v;
  for (uint32_t f = 0; f <= kAllFlags; ++f)
    if (flags_valid(f)) v.push_back(f);
  return v;
}
const std::vector<uint32_t> kFlagSets = valid_flag_sets();

std::string flag_str(uint32_t f) {
  std::string s;
  if (f & kMaximize) s += "max|";
  if (f & kWeightDecay) s += "wd|";
  if (f & kMomentum) s += "mom|";
  if (f & kNesterov) s += "nest|";
  if (f & kFirstStep) s += "first|";
  if (s.empty()) return "plain";
  s.pop_back();
  return s;
}

struct FlatCase {
  int64_t n;
  int op, ob, og;
  uint32_t flags;
  int hyper;
  int steps;
  int grid_kind;
  Order order;
  uint64_t seed;
  bool null_buf;
};

template <class T>
void run_flat(const FlatCase& c) {
  Rng rng(c.seed);
  SpanData<T> d(c.n, c.op, c.ob, c.og, c.null_buf && !(c.flags & kMomentum), rng);
  const Hyper& h = kHypers[c.hyper];
  dim3 grid, block;
  grid_for<T>(c.grid_kind, c.n, grid, block);
  uint64_t bad = 0;
  for (int s = 0; s < c.steps && bad == 0; ++s) {
    const uint32_t flags = s == 0 ? c.flags : (c.flags & ~uint32_t{kFirstStep});
    if (s > 0) d.new_grad(rng);
    const cuda::FlatArgs<T> a{d.p.data(), d.buf_ptr(), d.g.data(), c.n,
                              launcher_scalars<T>(h), flags, AmpPtrs{}, HyperPtrs{}};
    host_shim::host_launch(cuda::sgd_flat_kernel<T>, grid, block, c.order, c.seed + s, a);
    d.ref(h, flags);
    char what[256];
    std::snprintf(what, sizeof what,
                  "flat %s n=%lld offsets p/b/g=%d/%d/%d flags=%s hyper=%d grid=%s(%ux%u) order=%s step=%d%s",
                  Ref<T>::name(), static_cast<long long>(c.n), c.op, c.ob, c.og,
                  flag_str(flags).c_str(), c.hyper, grid_name(c.grid_kind), grid.x, block.x,
                  host_shim::order_name(c.order), s, d.null_buf ? " buf=null" : "");
    bad += d.check(what);
    ++g_steps;
  }
  ++g_cases;
  if (bad) {
    g_mismatches += bad;
    ++g_failed_cases;
    if (g_fail_fast) throw FailFast{};
  }
}

const Order kOrders[] = {Order::kForward, Order::kReverse, Order::kShuffled};

template <class T>
void flat_suite(bool all_sizes, bool all_grids) {
  Rng pick(1000 + sizeof(T) * 17 + std::strlen(Ref<T>::name()));
  uint64_t idx = 0;
  const int steps = 3;
  // 1. every size 0..1025 (a subset with --quick / for the other dtypes), every element offset
  //    0..7 (equal for p, buf and grad), plus two patterns with different misalignments.
  //    Flags, hyper-parameters, grids and thread orders rotate across the cases.
  std::vector<int64_t> sizes;
  for (int64_t n = 0; n <= 1025; ++n) {
    const bool small = n <= 70 || n >= 1000 || (n & (n - 1)) == 0 || ((n + 1) & n) == 0 ||
                       (((n - 1) & (n - 2)) == 0);
    if (all_sizes || small || n % 37 == 0) sizes.push_back(n);
  }
  for (const int64_t n : sizes) {
    for (int pattern = 0; pattern < 10; ++pattern) {
      int op, ob, og;
      if (pattern < 8) {
        op = ob = og = pattern;
      } else {
        op = static_cast<int>(pick.below(8));
        ob = static_cast<int>(pick.below(8));
        og = static_cast<int>(pick.below(8));
        if (op == og && op == ob) og = (og + 1) % 8;
      }
      FlatCase c{n, op, ob, og, kFlagSets[idx % kFlagSets.size()], static_cast<int>(idx % 3), steps,
                 static_cast<int>((idx / 3) % kGridKinds), kOrders[(idx / 7) % 3], idx * 31 + 7,
                 (idx / 5) % 2 == 0};
      run_flat<T>(c);
      ++idx;
    }
  }
  // 2. all 20 flag sets on a few sizes, every offset, every grid kind (rotating orders).
  const int64_t few[] = {1, 3, 4, 8, 9, 17, 33, 63, 255, 257, 1025};
  const int n_few = g_quick ? 4 : static_cast<int>(sizeof few / sizeof few[0]);
  for (int si = 0; si < n_few; ++si) {
    for (const uint32_t f : kFlagSets) {
      for (int o = 0; o < 8; ++o) {
        for (int gk = 0; gk < kGridKinds; ++gk, ++idx) {
          if (!all_grids && gk != static_cast<int>((o + 3 * si + f) % kGridKinds)) continue;
          const int og = (o % 3 == 2) ? (o + 3) % 8 : o;  // some with a misaligned grad
          FlatCase c{few[si], o, o, og, f, static_cast<int>(idx % 3), steps, gk, kOrders[idx % 3],
                     idx * 131 + 3, idx % 2 == 0};
          run_flat<T>(c);
        }
      }
    }
  }
  // 3. 2^20 + 3 elements: the launcher's grid, a small grid (long grid-stride walks), and
  //    different misalignments (all-scalar path).
  const int64_t big = (int64_t{1} << 20) + 3;
  const FlatCase bigs[] = {
      {big, 0, 0, 0, kMomentum | kNesterov | kWeightDecay, 0, 2, kLauncher, Order::kForward, 11, false},
      {big, 3, 3, 3, kMomentum | kMaximize | kFirstStep, 1, 2, kSmallStride, Order::kShuffled, 12, false},
      {big, 1, 2, 1, kMomentum | kWeightDecay, 1, 2, kLauncher, Order::kReverse, 13, false},
      {big, 5, 0, 5, kWeightDecay, 2, 2, kOversubscribed, Order::kShuffled, 14, true},
  };
  const int n_big = g_quick ? 2 : 4;
  for (int k = 0; k < n_big; ++k) run_flat<T>(bigs[k]);
}

// ---- multi-tensor kernel cases ----------------------------------------------------------------
struct TinyLimits1x1 {
  static constexpr int kTensors = 1, kBlocks = 1;
};
struct TinyLimits3x5 {
  static constexpr int kTensors = 3, kBlocks = 5;
};
struct TinyLimits7x2 {
  static constexpr int kTensors = 7, kBlocks = 2;
};

// CUDA's kernel-parameter limits: 4 KB (all toolkits), 32764 bytes (CUDA >= 12.1, sm_70+).
static_assert(sizeof(cuda::ListArgs<double, cuda::ListLimits4K::kTensors, cuda::ListLimits4K::kBlocks>) <= 4096,
              "ListLimits4K arguments exceed 4 KB");
static_assert(sizeof(cuda::ListArgs<double, cuda::ListLimits32K::kTensors, cuda::ListLimits32K::kBlocks>) <= 32764,
              "ListLimits32K arguments exceed 32764 bytes");
static_assert(sizeof(bf16_t) == 2 && sizeof(fp16_t) == 2, "storage types");
static_assert(sizeof(cuda::Pack<bf16_t>) == 16 && alignof(cuda::Pack<float>) == 16, "Pack");

struct ListCase {
  int n_tensors;
  int64_t max_small;  // most tensors are 0..max_small elements
  int n_big;          // and this many are > 2 * 65536
  uint32_t flags;
  int hyper, steps, threads;
  Order order;
  uint64_t seed;
  int min_launches;  // the case must really span this many launches
  bool need_split = false;  // some span must be continued from one launch into the next
  int big_chunks = 2;       // big tensors have big_chunks * 65536 + 1 .. (big_chunks + 1) * 65536
};

template <class T, class Limits>
void run_list(const ListCase& c, const char* limits_name) {
  Rng rng(c.seed);
  const bool momentum = (c.flags & kMomentum) != 0;
  std::vector<std::unique_ptr<SpanData<T>>> spans;
  for (int k = 0; k < c.n_tensors; ++k) {
    int64_t n;
    if (k < c.n_big) {
      n = c.big_chunks * cuda::kChunk + 1 + static_cast<int64_t>(rng.below(static_cast<uint64_t>(cuda::kChunk)));
    } else {
      const uint64_t r = rng.below(10);
      n = r < 2 ? 0 : r < 3 ? static_cast<int64_t>(rng.below(40)) : static_cast<int64_t>(rng.below(static_cast<uint64_t>(c.max_small) + 1));
    }
    const bool same = rng.below(2) == 0;
    const int op = static_cast<int>(rng.below(8));
    const int ob = same ? op : static_cast<int>(rng.below(8));
    const int og = same ? op : static_cast<int>(rng.below(8));
    spans.emplace_back(new SpanData<T>(n, op, ob, og, !momentum, rng));
  }
  // shuffle so that big and zero-sized tensors are spread over the list
  for (size_t k = spans.size(); k > 1; --k) std::swap(spans[k - 1], spans[rng.below(k)]);

  const Hyper& h = kHypers[c.hyper];
  uint64_t bad = 0;
  int launches = 0, splits = 0;
  std::vector<T*> params, bufs, grads;
  std::vector<int64_t> numels;
  for (auto& s : spans) {
    params.push_back(s->p.data());
    bufs.push_back(s->buf_ptr());
    grads.push_back(s->g.data());
    numels.push_back(s->n);
  }
  std::string plan_error;
  for (int st = 0; st < c.steps && bad == 0; ++st) {
    const uint32_t flags = st == 0 ? c.flags : (c.flags & ~uint32_t{kFirstStep});
    if (st > 0)
      for (auto& s : spans) s->new_grad(rng);
    launches = 0;
    splits = 0;
    using Args = cuda::ListArgs<T, Limits::kTensors, Limits::kBlocks>;
    cuda::plan_list<T, Limits>(
        params.data(), momentum ? bufs.data() : nullptr, grads.data(), numels.data(),
        static_cast<int64_t>(spans.size()), launcher_scalars<T>(h), flags,
        AmpPtrs{}, HyperPtrs{}, [&](const Args& a, int blocks) {
          ++launches;
          if (blocks > 0 && a.block_chunk[0] > 0) ++splits;  // entry 0 continues a span
          if (blocks < 1 || blocks > Limits::kBlocks) plan_error = "blocks out of range";
          for (int k = 0; k < blocks; ++k)
            if (a.block_tensor[k] >= Limits::kTensors || a.param[a.block_tensor[k]] == nullptr ||
                a.block_chunk[k] < 0 ||
                int64_t{a.block_chunk[k]} * cuda::kChunk >= a.numel[a.block_tensor[k]])
              plan_error = "block " + std::to_string(k) + " points to no chunk";
          if (!plan_error.empty()) return;  // do not run a kernel on garbage
          host_shim::host_launch(cuda::sgd_list_kernel<T, Limits::kTensors, Limits::kBlocks>,
                                 dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(c.threads)),
                                 c.order, c.seed * 7 + static_cast<uint64_t>(launches), a);
        });
    for (auto& s : spans) s->ref(h, flags);
    char what[256];
    std::snprintf(what, sizeof what, "list %s %s tensors=%d flags=%s threads=%d order=%s step=%d",
                  Ref<T>::name(), limits_name, c.n_tensors, flag_str(flags).c_str(), c.threads,
                  host_shim::order_name(c.order), st);
    for (size_t k = 0; k < spans.size(); ++k)
      bad += spans[k]->check(std::string(what) + " span " + std::to_string(k) + " (n=" +
                             std::to_string(spans[k]->n) + ")");
    if (!plan_error.empty()) {
      report(std::string(what) + ": plan_list: " + plan_error);
      ++bad;
    }
    if (c.need_split && splits == 0) {
      report(std::string(what) + ": no span was split over two launches, the case needs one");
      ++bad;
    }
    if (launches < c.min_launches) {
      report(std::string(what) + ": only " + std::to_string(launches) +
             " launches, the case needs >= " + std::to_string(c.min_launches));
      ++bad;
    }
    ++g_steps;
  }
  if (g_verbose)
    std::printf("  list %s %s: %d tensors, %d launches per step, %d continued spans\n", Ref<T>::name(),
                limits_name, c.n_tensors, launches, splits);
  ++g_cases;
  if (bad) {
    g_mismatches += bad;
    ++g_failed_cases;
    if (g_fail_fast) throw FailFast{};
  }
}

template <class T>
void list_suite(uint64_t seed) {
  if (std::is_same<T, bf16_t>::value && !g_quick) {
    // ListLimits4K with full batches of 320 blocks: three spans of 111..112 chunks (22 M
    // elements), so a span is split over two launches at the real limits too.
    ListCase c{3, 3000, 3, kMomentum | kWeightDecay, 0, 1, 256, Order::kShuffled, seed, 2, true, 110};
    run_list<T, cuda::ListLimits4K>(c, "ListLimits4K-full");
  }
  const int big = g_quick ? 2 : 3;
  // ListLimits4K: 120 tensors > 36 per launch; big tensors span 3..5 chunks.
  run_list<T, cuda::ListLimits4K>({120, 5000, big, kMomentum | kNesterov | kFirstStep | kWeightDecay, 0, 3, 256,
                                   Order::kShuffled, seed + 1, 3},
                                  "ListLimits4K");
  run_list<T, cuda::ListLimits4K>({100, g_quick ? 3000 : 8000, 2, kMaximize | kWeightDecay, 1, 2, 128, Order::kReverse, seed + 2, 2},
                                  "ListLimits4K");
  // ListLimits32K: > 320 tensors, so two launches; 64 threads a block (each thread copies 22 KB
  // of arguments here, as a by-value kernel parameter).
  run_list<T, cuda::ListLimits32K>({480, 3000, 1, kMomentum | kMaximize, 2, 2, 64,
                                    Order::kForward, seed + 3, 2},
                                   "ListLimits32K");
  // Tiny limits: every batching branch of plan_list (block-full, tensor-full, spans split over
  // launches and continued as entry 0).
  run_list<T, TinyLimits1x1>({40, 3000, 2, kMomentum | kFirstStep, 0, 2, 32, Order::kShuffled, seed + 4, 30, true},
                             "Tiny1x1");
  run_list<T, TinyLimits3x5>({60, 20000, g_quick ? 2 : 3, kMomentum | kNesterov | kWeightDecay, 1, 2, 64,
                              Order::kReverse, seed + 5, 10, true, 5},
                             "Tiny3x5");
  run_list<T, TinyLimits7x2>({50, 10000, 2, kWeightDecay | kMomentum | kFirstStep, 2, 2, 96, Order::kForward,
                              seed + 6, 10, true},
                             "Tiny7x2");
}

}  // namespace

// ---- GradScaler and the clip in the kernel (AmpPtrs) -------------------------------------------
// Reference, written from torch's three steps: GradScaler.unscale_ (inv = float(1 / double(scale));
// g = r(O(g) * O(inv)) unless inv == 1), clip_grad_norm_'s g.mul_(coef) (g = r(O(g) * O(coef)),
// coef of g's dtype) and, unless found_inf != 0, the step above with that g. The gradient so
// computed is written back, also on a skipped step, as torch leaves it.
template <class T>
void amp_suite() {
  using R = Ref<T>;
  using O = typename R::O;
  const float scales[] = {65536.f, 1000.f, 3.0f, 1.f, 0.0078125f};
  const float founds[] = {0.f, 1.f};
  const int64_t sizes[] = {1, 97, 1030};
  uint64_t seed = 9001;
  for (float scale : scales) {
    for (float found : founds) {
      for (int use_scale = 0; use_scale < 2; ++use_scale) {
        for (int64_t n : sizes) {
          for (int mode = 0; mode < 4; ++mode) {
            const bool list = mode & 1, clip = mode & 2;
            // Each hyper-parameter: 0 a host scalar; 1 an fp32 and 2 an fp64 value in device
            // memory (HyperPtrs), with the host scalar set to garbage so that only the pointer
            // can give the bits. A device momentum or weight_decay is sometimes 0, which must
            // skip its ops (the flags the host set are cleared in the kernel).
            const int lr_mode = static_cast<int>(seed % 3);
            const int m_mode = static_cast<int>((seed / 3) % 3), d_mode = static_cast<int>((seed / 9) % 3);
            const int wd_mode = static_cast<int>((seed / 27) % 3);
            const bool m_zero = m_mode != 0 && (seed / 81) % 4 == 0;
            const bool wd_zero = wd_mode != 0 && (seed / 81) % 4 == 1;
            // The first step: the host's flag alone (0), or kFirstStep set and first_step in
            // device memory saying true (1, a first step) or false (2, the buffers were
            // stepped: a momentum step)
            const int first_mode = static_cast<int>((seed / 7) % 3);
            const bool first_dev = first_mode == 1;
            const uint32_t flags = kMomentum | kWeightDecay | (seed % 2 ? kNesterov : 0u) |
                                   ((seed / 2) % 5 == 0 || first_mode != 0 ? kFirstStep : 0u);
            uint32_t ref_flags = flags;
            if (first_mode == 2) ref_flags &= ~kFirstStep;
            if (m_zero) ref_flags &= ~(kMomentum | kNesterov | kFirstStep);
            if (wd_zero) ref_flags &= ~kWeightDecay;
            Rng rng(++seed);
            SpanData<T> d(n, static_cast<int>(seed % 3), static_cast<int>(seed % 3),
                          static_cast<int>(seed % 3), false, rng);
            Hyper h = kHypers[1 + seed % 2];
            if (m_zero) h.momentum = 0.0;
            if (wd_zero) h.wd = 0.0;
            const float lr32 = static_cast<float>(h.lr), m32 = static_cast<float>(h.momentum),
                        d32 = static_cast<float>(h.dampening), wd32 = static_cast<float>(h.wd);
            const double lr64 = h.lr, m64 = h.momentum, d64 = h.dampening, wd64 = h.wd;
            if (lr_mode == 1) h.lr = static_cast<double>(lr32);  // what an fp32 tensor holds
            if (m_mode == 1) h.momentum = static_cast<double>(m32);
            if (d_mode == 1) h.dampening = static_cast<double>(d32);
            if (wd_mode == 1) h.wd = static_cast<double>(wd32);
            h.momentum_dev = m_mode != 0;
            h.dampening_f32 = d_mode == 1;
            Hyper launch_h = h;
            if (lr_mode != 0) launch_h.lr = 123.0;
            if (m_mode != 0) launch_h.momentum = 0.25;
            if (d_mode != 0) launch_h.dampening = 0.375;
            if (wd_mode != 0) launch_h.wd = 7.0;
            const auto ptr = [](int mode, const float* f, const double* g) {
              return ScalarPtr{mode == 1 ? f : nullptr, mode == 2 ? g : nullptr};
            };
            const HyperPtrs dev{ptr(lr_mode, &lr32, &lr64), ptr(m_mode, &m32, &m64),
                                ptr(d_mode, &d32, &d64), ptr(wd_mode, &wd32, &wd64)};
            std::vector<T> rg(d.g.data(), d.g.data() + n);
            const float inv = use_scale ? static_cast<float>(1.0 / static_cast<double>(scale)) : 1.f;
            // a coefficient of T below 1, as clip_grad_norm_ gives one when it clips
            const T coef = R::narrow(static_cast<O>(
                0.0625 + 0.875 * static_cast<double>(rng.next() >> 11) / 9007199254740992.0));
            for (int64_t i = 0; i < n; ++i) {
              const size_t k = static_cast<size_t>(i);
              if (inv != 1.f) rg[k] = R::narrow(R::widen(rg[k]) * static_cast<O>(inv));
              if (clip) rg[k] = R::narrow(R::widen(rg[k]) * R::widen(coef));
              if (found == 0.f) ref_step(d.rp[k], d.rb[k], rg[k], h, ref_flags);
            }
            const AmpPtrs amp{use_scale ? &scale : nullptr, &found, clip ? &coef : nullptr,
                              first_mode != 0 ? &first_dev : nullptr};
            if (list) {
              T* ps[] = {d.p.data()};
              T* bs[] = {d.b.data()};
              T* gs[] = {d.g.data()};
              const int64_t ns[] = {n};
              using L = cuda::ListLimits4K;
              cuda::plan_list<T, L>(ps, bs, gs, ns, 1, launcher_scalars<T>(launch_h), flags, amp,
                                    dev,
                                    [&](const cuda::ListArgs<T, L::kTensors, L::kBlocks>& a,
                                        int blocks) {
                                      host_shim::host_launch(
                                          cuda::sgd_list_kernel<T, L::kTensors, L::kBlocks>,
                                          dim3(static_cast<unsigned>(blocks)), dim3(64),
                                          Order::kReverse, seed, a);
                                    });
            } else {
              const cuda::FlatArgs<T> a{d.p.data(), d.b.data(), d.g.data(), n,
                                        launcher_scalars<T>(launch_h), flags, amp, dev};
              host_shim::host_launch(cuda::sgd_flat_kernel<T>, dim3(3), dim3(64),
                                     Order::kForward, seed, a);
            }
            const char* where[] = {"host", "fp32", "fp64"};
            char what[320];
            std::snprintf(what, sizeof what,
                          "amp %s %s n=%lld scale=%g%s found_inf=%g flags=%u first=%s lr=%s "
                          "m=%s%s d=%s wd=%s%s clip=%s",
                          R::name(), list ? "list" : "flat", static_cast<long long>(n),
                          static_cast<double>(scale), use_scale ? "" : " (not given)",
                          static_cast<double>(found), flags,
                          first_mode == 0 ? "host" : first_dev ? "device-true" : "device-false",
                          where[lr_mode], where[m_mode],
                          m_zero ? " (0)" : "", where[d_mode], where[wd_mode],
                          wd_zero ? " (0)" : "",
                          clip ? std::to_string(static_cast<double>(R::widen(coef))).c_str()
                               : "none");
            uint64_t bad = d.check(what);
            for (int64_t i = 0; i < n && bad == 0; ++i) {
              if (!same_bits(d.g[i], rg[static_cast<size_t>(i)])) {
                report(std::string(what) + ": gradient " + std::to_string(i) + " WRONG");
                ++bad;
              }
            }
            if (bad) {
              ++g_failed_cases;
              g_mismatches += bad;
              if (g_fail_fast) throw FailFast{};
            }
            ++g_cases;
          }
        }
      }
    }
  }
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // keep what was printed if a sanitizer aborts
#ifdef HKT_PLANTED_BUG
  std::printf("planted bug: %s\n", HKT_PLANTED_BUG);  // proves the patched header was compiled
#endif
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") g_quick = true;
    else if (a == "--fail-fast") g_fail_fast = true;
    else if (a == "--verbose") g_verbose = true;
    else {
      std::fprintf(stderr, "usage: %s [--quick] [--fail-fast] [--verbose]\n", argv[0]);
      return 2;
    }
  }
  if (kFlagSets.size() != 20) {
    std::fprintf(stderr, "expected 20 valid flag sets, got %zu\n", kFlagSets.size());
    return 1;
  }
  auto timed = [](const char* name, auto&& fn) {
    const auto t0 = std::chrono::steady_clock::now();
    const uint64_t c0 = g_cases;
    fn();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (g_verbose) std::printf("%-12s %6llu cases %7.2f s\n", name, static_cast<unsigned long long>(g_cases - c0), s);
  };
  try {
#if HKT_DTYPES & 1
    timed("flat fp32", [] { flat_suite<float>(!g_quick, !g_quick); });
#endif
#if HKT_DTYPES & 2
    timed("flat fp64", [] { flat_suite<double>(false, false); });
#endif
#if HKT_DTYPES & 4
    timed("flat bf16", [] { flat_suite<bf16_t>(false, false); });
#endif
#if HKT_DTYPES & 8
    timed("flat fp16", [] { flat_suite<fp16_t>(false, false); });
#endif
#if HKT_DTYPES & 1
    timed("list fp32", [] { list_suite<float>(100); });
#endif
#if HKT_DTYPES & 2
    timed("list fp64", [] { list_suite<double>(200); });
#endif
#if HKT_DTYPES & 4
    timed("list bf16", [] { list_suite<bf16_t>(300); });
#endif
#if HKT_DTYPES & 8
    timed("list fp16", [] { list_suite<fp16_t>(400); });
#endif
#if HKT_DTYPES & 1
    timed("amp fp32", [] { amp_suite<float>(); });
#endif
#if HKT_DTYPES & 2
    timed("amp fp64", [] { amp_suite<double>(); });
#endif
#if HKT_DTYPES & 4
    timed("amp bf16", [] { amp_suite<bf16_t>(); });
#endif
#if HKT_DTYPES & 8
    timed("amp fp16", [] { amp_suite<fp16_t>(); });
#endif
  } catch (const FailFast&) {
    std::printf("stopped at the first failing case (--fail-fast)\n");
  }
  std::printf("cases checked: %llu (steps %llu, elements compared %llu, launches %llu, thread runs %llu)\n",
              static_cast<unsigned long long>(g_cases), static_cast<unsigned long long>(g_steps),
              static_cast<unsigned long long>(g_elements),
              static_cast<unsigned long long>(host_shim::stats().launches),
              static_cast<unsigned long long>(host_shim::stats().thread_runs));
  std::printf("failed cases: %llu, mismatches: %llu\n", static_cast<unsigned long long>(g_failed_cases),
              static_cast<unsigned long long>(g_mismatches));
  return g_mismatches == 0 ? 0 : 1;
}
