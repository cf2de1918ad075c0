// momentum_ops.cpp — the one torch-facing file: the ops' schemas (TORCH_LIBRARY), their CPU and
// CUDA implementations (TORCH_LIBRARY_IMPL), argument checks, dtype dispatch, and the small
// pybind11 module (the CPU instruction-set switch).
//
// Ops (torch.ops.momentum_cuda.*; fake kernels in momentum_cuda/_ops.py):
//   sgd_step_flat_  params, grads and buffers of many tensors at equal offsets of three 1-D
//                   buffers; `segments` lists the tensors. One kernel call.
//   sgd_step_list_  lists of separate dense tensors of one device and dtype. One kernel call.
//   sgd_step_master_list_  bf16 parameters with exact fp32 masters (bf16_split.h): fp32
//                   buffers, int16 remainders, packed tie bits; torch's fp32 step on each
//                   master (CPU and CUDA kernels; the Triton one is a custom op of _ops.py).
//   sgd_step_sr_list_  bf16 parameters, gradients and buffers; torch's fp32 step on the widened
//                   values, the parameter rounded stochastically (stochastic.h) with keys[i]'s
//                   random bits, the buffer to nearest even (CPU and CUDA; Triton: _ops.py).
//   sgd_step_qmom_list_  fp32 parameters whose momentum buffers are stored narrow
//                   (momentum_dtype.h): bf16, or int8 codes with a scale per 256 elements;
//                   torch's fp32 step on the widened buffer (CPU and CUDA; Triton: _ops.py).
//   sgd_step_fp16_master_list_  fp16 parameters with separate fp32 masters (fp16_master.h):
//                   torch's fp32 step on each master, the parameter its rounding (CPU and
//                   CUDA; Triton: _ops.py).
// Both update param(s) and momentum buffer(s) in place and read the gradients; given
// torch.amp.GradScaler's grad_scale and found_inf (tensors), they unscale the gradients in place
// and skip the update when found_inf != 0, and given clip_coef they multiply the gradients by it
// (optim.clip_grad_norm_), without a host sync on CUDA. Every implementation validates ALL of
// its tensors and scalars before it touches any memory, so a bad call raises a clear error
// (naming the argument and the value) and changes nothing. The kernels behind it (csrc/cpu/, csrc/cuda/) take plain pointers and scalars only.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "cpu/momentum_cpu.h"
#include "momentum_cuda/momentum_dtype.h"  // kQBlock
#include "momentum_cuda/sgd_math.h"
#include "momentum_cuda/stochastic.h"  // mc_sr_key

#ifdef MOMENTUM_CUDA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/sgd_cuda.h"
#endif

namespace momentum_cuda {
namespace {

#ifdef MOMENTUM_CUDA_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

#ifdef MOMENTUM_CUDA_WITH_CUDA
/// ATen scalar type -> the CUDA kernels' storage type (bit-compatible).
template <class T>
struct KernelType {
  using type = T;
};
template <>
struct KernelType<at::BFloat16> {
  using type = cuda::bf16_t;
};
template <>
struct KernelType<at::Half> {
  using type = cuda::fp16_t;
};

/// Launches on the tensors' device and current stream; a launch error raises.
template <class T>
void launch_cuda(const std::vector<Span>& spans, bool one_span, const StepHyper& hyper,
                 at::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  using K = typename KernelType<T>::type;
  const cudaError_t err = one_span
      ? sgd_step_cuda_flat<K>(spans[0], hyper, stream)
      : sgd_step_cuda_list<K>(spans.data(), static_cast<int64_t>(spans.size()), hyper, stream);
  TORCH_CHECK(err == cudaSuccess,
              "momentum_cuda: CUDA launch failed (occupancy query or kernel): ",
              cudaGetErrorString(err));
}
#endif

std::string describe(const at::Tensor& t) {
  std::string s = std::string(c10::toString(t.scalar_type())) + " " + t.device().str() +
                  " tensor of shape " + c10::str(t.sizes());
  return s;
}

/// t places every element where p does: equal sizes, and equal strides on each dimension of
/// size other than 1. A size-1 dimension's stride moves nothing and torch leaves it free (the
/// gradient of a (n, 1) parameter may come transposed); the kernels walk memory from
/// data_ptr(), so only the offsets matter.
bool same_layout(const at::Tensor& t, const at::Tensor& p) {
  if (t.sizes() != p.sizes()) return false;
  for (int64_t d = 0; d < p.dim(); ++d) {
    if (p.size(d) != 1 && t.stride(d) != p.stride(d)) return false;
  }
  return true;
}

void check_scalar(const char* name, double v) {
  TORCH_CHECK(std::isfinite(v), name, " must be a finite number, got ", v);
}

/// "[i]" after a list argument's name in a message; nothing for a single tensor (i < 0).
/// Messages are formatted only when a check fails (TORCH_CHECK evaluates them then), so the
/// checks that run per tensor at every step allocate no strings.
struct At {
  int64_t i;
};
std::ostream& operator<<(std::ostream& os, At at) {
  if (at.i >= 0) os << '[' << at.i << ']';
  return os;
}
/// An argument's name in a message: the list's with its index ("params[3]"), or the single
/// tensor's ("param").
struct Name {
  const char* list;
  const char* single;
  At at;
};
std::ostream& operator<<(std::ostream& os, const Name& n) {
  return os << (n.at.i < 0 ? n.single : n.list) << n.at;
}

/// Checks one (param, grad, buf) triple of a step on `device_type`; `at` names it in messages
/// (list entries "params[i]"; single-tensor and flat entries their own arguments).
void check_triple(At at, const at::Tensor& p, const at::Tensor& g, const at::Tensor* b,
                  c10::DeviceType device_type, std::optional<at::ScalarType>& dtype,
                  std::optional<at::Device>& device) {
  const Name pn{"params", "param", at}, gn{"grads", "grad", at},
      bn{"momentum_buffers", "momentum_buffer", at};
  TORCH_CHECK(p.defined(), pn, " is undefined (None)");
  TORCH_CHECK(g.defined(), gn, " is undefined (None)");
  TORCH_CHECK(p.layout() == at::kStrided, pn, " must be a dense (strided) tensor, got layout ",
              p.layout());
  TORCH_CHECK(g.layout() == at::kStrided, gn, " must be a dense (strided) tensor, got layout ",
              g.layout(), " (sparse gradients are not supported)");
  TORCH_CHECK(p.device().type() == device_type, pn, " must be on a ", device_type,
              " device for this entry point, got ", describe(p));
  const auto st = p.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              pn, " must be float32, float64, bfloat16 or float16, got ", describe(p));
  if (!dtype) dtype = st;
  if (!device) device = p.device();
  TORCH_CHECK(st == *dtype, pn, " has dtype ", st, " but params[0] has dtype ", *dtype,
              "; one call takes one dtype");
  TORCH_CHECK(p.device() == *device, pn, " is on ", p.device(), " but params[0] is on ", *device);
  // Dense and non-overlapping (contiguous, channels_last, ...): its numel elements fill one
  // block of memory, which the kernel walks in memory order, as TensorIterator does.
  TORCH_CHECK(p.is_non_overlapping_and_dense(), pn,
              " must be dense and non-overlapping, got strides ", c10::str(p.strides()),
              " for shape ", c10::str(p.sizes()));

  auto check_like = [&](const at::Tensor& t, const Name& n) {
    TORCH_CHECK(t.layout() == at::kStrided, n, " must be a dense (strided) tensor");
    TORCH_CHECK(t.device() == p.device(), n, " is on ", t.device(), " but ", pn, " is on ",
                p.device());
    TORCH_CHECK(t.scalar_type() == st, n, " has dtype ", t.scalar_type(), " but ", pn,
                " has dtype ", st);
    TORCH_CHECK(t.sizes() == p.sizes(), n, " has shape ", c10::str(t.sizes()), " but ", pn,
                " has shape ", c10::str(p.sizes()));
    TORCH_CHECK(same_layout(t, p), n, " has strides ", c10::str(t.strides()), " but ", pn,
                " has strides ", c10::str(p.strides()),
                " (the memory layouts must match: equal strides on every dimension of size > 1)");
    const auto ov = at::get_overlap_status(t, p);
    TORCH_CHECK(ov == at::MemOverlapStatus::No, n, " overlaps ", pn, " in memory");
  };
  check_like(g, gn);
  if (b != nullptr) {
    TORCH_CHECK(b->defined(), bn, " is undefined (None) but momentum != 0");
    check_like(*b, bn);
    TORCH_CHECK(at::get_overlap_status(*b, g) == at::MemOverlapStatus::No, bn, " overlaps ", gn,
                " in memory");
  }
}

/// No two tensors of a call may share memory: torch updates them one after the other, the
/// kernel all at once. Each tensor is dense, so it is the byte range [data, data + nbytes).
/// (A flat call is one triple, already checked; its segments are checked to be disjoint.)
using NamedLists = std::initializer_list<std::pair<at::TensorList, const char*>>;
void check_no_cross_overlap(NamedLists lists) {
  struct Range {
    uintptr_t lo, hi;
    const char* list;
    size_t i;
  };
  std::vector<Range> r;
  for (const auto& [list, name] : lists) {
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].numel() == 0) continue;
      const auto lo = reinterpret_cast<uintptr_t>(list[i].data_ptr());
      r.push_back({lo, lo + static_cast<uintptr_t>(list[i].nbytes()), name, i});
    }
  }
  std::sort(r.begin(), r.end(), [](const Range& a, const Range& b) { return a.lo < b.lo; });
  for (size_t k = 1; k < r.size(); ++k) {
    TORCH_CHECK(r[k].lo >= r[k - 1].hi, r[k].list, "[", r[k].i, "] overlaps ", r[k - 1].list, "[",
                r[k - 1].i, "] in memory; every tensor of a step must be distinct");
  }
}

/// The step's tensor arguments besides the lists: torch.amp.GradScaler's, as GradScaler.step
/// hands them to an optimizer that sets _step_supports_amp_scaling (found_inf != 0 skips the
/// update; grad_scale unscales the gradients first, written back, also on a skipped step, as
/// GradScaler.unscale_ does), a clip coefficient (optim.clip_grad_norm_'s: the gradients,
/// unscaled, are multiplied by it and written back, as torch's g.mul_(coef) leaves them) and
/// hyper-parameters held in tensors (read in place of the doubles, on the device by the CUDA
/// kernels: no host sync; `momentum_tensor` needs the buffers, and a zero there leaves them
/// as they are, as momentum == 0 does in torch's for-loop). `first_step_tensor` (1-element
/// bool, with first_step=True) decides the first step on the device: true, the buffers were never
/// stepped (buffer = gradient); false, they were (the step of first_step=False).
struct StepTensors {
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  const std::optional<at::Tensor>& lr_tensor;
  const std::optional<at::Tensor>& clip_coef;
  const std::optional<at::Tensor>& momentum_tensor;
  const std::optional<at::Tensor>& dampening_tensor;
  const std::optional<at::Tensor>& weight_decay_tensor;
  const std::optional<at::Tensor>& first_step_tensor;
  /// Whether the gradients are touched before the update (or the update may be skipped).
  bool any() const { return given(grad_scale) || given(found_inf) || given(clip_coef); }
  static bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }
};
const std::optional<at::Tensor> kNone;
const StepTensors kNoTensors{kNone, kNone, kNone, kNone, kNone, kNone, kNone, kNone};

/// Each is a 1-element tensor on the parameters' device: float32 (GradScaler's), float32 or
/// float64 (the hyper-parameters), of the parameters' dtype (clip_coef), bool
/// (first_step_tensor).
void check_tensors(const StepTensors& st, const at::Device& device, at::ScalarType dtype) {
  for (const auto& [t, n] : {std::pair{&st.grad_scale, "grad_scale"},
                             std::pair{&st.found_inf, "found_inf"},
                             std::pair{&st.lr_tensor, "lr_tensor"},
                             std::pair{&st.clip_coef, "clip_coef"},
                             std::pair{&st.momentum_tensor, "momentum_tensor"},
                             std::pair{&st.dampening_tensor, "dampening_tensor"},
                             std::pair{&st.weight_decay_tensor, "weight_decay_tensor"},
                             std::pair{&st.first_step_tensor, "first_step_tensor"}}) {
    if (!StepTensors::given(*t)) continue;
    const at::Tensor& x = **t;
    const bool amp = t == &st.grad_scale || t == &st.found_inf, clip = t == &st.clip_coef;
    const bool first = t == &st.first_step_tensor;
    const bool dtype_ok = clip    ? x.scalar_type() == dtype
                          : first ? x.scalar_type() == at::kBool
                                  : x.scalar_type() == at::kFloat ||
                                        (!amp && x.scalar_type() == at::kDouble);
    const std::string want = clip    ? std::string(c10::toString(dtype)) + " (the parameters' dtype)"
                             : first ? "bool"
                             : amp   ? "float32"
                                     : "float32 or float64";
    TORCH_CHECK(x.layout() == at::kStrided && x.numel() == 1 && dtype_ok && x.device() == device,
                n, " must be a 1-element ", want, " tensor on ", device,
                " (the parameters' device), got ", describe(x));
  }
}

/// A hyper-parameter tensor in host memory, read (no sync) and checked finite.
double host_value(const at::Tensor& t, const char* name) {
  const double v = t.item<double>();
  check_scalar(name, v);
  return v;
}

/// StepHyper's dampening for a dampening tensor in host memory: torch's alpha = 1 - dampening
/// is then a tensor op in the tensor's dtype (a float32 1 - d is rounded to float32), so this
/// returns the d' whose double 1 - d' is that value: exact for a float32 result in
/// [2^-29, 2^30) or 0, checked.
double host_dampening(const at::Tensor& t) {
  const double d = host_value(t, "dampening_tensor");
  if (t.scalar_type() != at::kFloat) return d;
  const double omd = static_cast<double>(1.0f - static_cast<float>(d));
  const double out = 1.0 - omd;
  TORCH_CHECK(1.0 - out == omd, "dampening_tensor = ", d, ": 1 - dampening = ", omd,
              " (float32) cannot be passed to the kernel exactly; give it as float64");
  return out;
}

/// A tensor's address for the CUDA kernels (null members when not given).
ScalarPtr device_scalar(const std::optional<at::Tensor>& t) {
  if (!StepTensors::given(t)) return ScalarPtr{nullptr, nullptr};
  const bool f64 = t->scalar_type() == at::kDouble;
  return ScalarPtr{f64 ? nullptr : t->data_ptr<float>(), f64 ? t->data_ptr<double>() : nullptr};
}

/// The StepFlags of torch's for-loop ops: nesterov and the first step's clone only with
/// momentum.
uint32_t step_flags(bool maximize, bool weight_decay, bool momentum, bool nesterov,
                    bool first_step) {
  const uint32_t f = (maximize ? kMaximize : 0u) | (weight_decay ? kWeightDecay : 0u) |
                     (momentum ? kMomentum : 0u) | (momentum && nesterov ? kNesterov : 0u) |
                     (momentum && first_step ? kFirstStep : 0u);
  TORCH_CHECK(flags_valid(f), "invalid flag set ", f);
  return f;
}

/// The hyper-parameters held in tensors (st.lr_tensor .. st.weight_decay_tensor, checked by
/// check_tensors): read here for the CPU (host memory: no sync), handed to the CUDA kernels as
/// pointers (read there by device_step: no sync). Then hyper.flags, the ops torch's for-loop
/// runs by the values read so far: a value in device memory sets its op's flags here, and the
/// kernel clears them if it reads a zero (cuda/sgd_kernel.cuh, device_step).
void resolve_hyper(StepHyper& hyper, const StepTensors& st, c10::DeviceType device_type,
                   bool need_buf, bool maximize, bool nesterov, bool first_step) {
  if (device_type == c10::DeviceType::CPU) {
    if (StepTensors::given(st.lr_tensor)) hyper.lr = host_value(*st.lr_tensor, "lr_tensor");
    if (StepTensors::given(st.momentum_tensor)) {
      hyper.momentum = host_value(*st.momentum_tensor, "momentum_tensor");
    }
    if (StepTensors::given(st.dampening_tensor)) {
      hyper.dampening = host_dampening(*st.dampening_tensor);
    }
    if (StepTensors::given(st.weight_decay_tensor)) {
      hyper.weight_decay = host_value(*st.weight_decay_tensor, "weight_decay_tensor");
    }
  } else {
    hyper.dev = HyperPtrs{device_scalar(st.lr_tensor), device_scalar(st.momentum_tensor),
                          device_scalar(st.dampening_tensor),
                          device_scalar(st.weight_decay_tensor)};
  }
  const bool wd_on = hyper.dev.weight_decay.f32 != nullptr ||
                     hyper.dev.weight_decay.f64 != nullptr || hyper.weight_decay != 0;
  const bool m_on = need_buf && (hyper.dev.momentum.f32 != nullptr ||
                                 hyper.dev.momentum.f64 != nullptr || hyper.momentum != 0);
  hyper.flags = step_flags(maximize, wd_on, m_on, nesterov, first_step);
}

/// The CPU step's GradScaler and clip work, done on the host before the kernel (its tensors are
/// host memory): unscales the spans' gradients and multiplies them by the clip coefficient with
/// torch's own ops (so their bits by construction), and says whether found_inf skips the update.
bool amp_on_host(const StepTensors& st, const std::vector<Span>& spans, const at::Tensor& like) {
  const float inv = StepTensors::given(st.grad_scale)
                        ? amp_inv_scale(st.grad_scale->item<float>())
                        : 1.f;
  const bool clip = StepTensors::given(st.clip_coef);
  if (inv != 1.f || clip) {
    std::vector<at::Tensor> views;
    views.reserve(spans.size());
    for (const auto& sp : spans) {
      views.push_back(at::from_blob(sp.grad, {sp.numel}, like.options()));
    }
    if (inv != 1.f) {
      at::Tensor found = at::zeros({}, like.options().dtype(at::kFloat));
      at::_amp_foreach_non_finite_check_and_unscale_(views, found,
                                                     at::full({}, inv, found.options()));
    }
    if (clip) {
      const at::Tensor coef = st.clip_coef->reshape({});
      for (auto& v : views) v.mul_(coef);
    }
  }
  return StepTensors::given(st.found_inf) && st.found_inf->item<float>() != 0.f;
}

/// The shared body of every step entry point for one device type.
void sgd_step_list(at::TensorList params, at::TensorList grads, at::TensorList bufs, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov,
                   bool maximize, bool first_step, c10::DeviceType device_type, bool single,
                   const at::Tensor& segments = at::Tensor(), const StepTensors& st = kNoTensors) {
  check_scalar("lr", lr);
  check_scalar("momentum", momentum);
  check_scalar("dampening", dampening);
  check_scalar("weight_decay", weight_decay);
  // A momentum tensor is read where it lives: the buffers are given, its value decides.
  const bool m_tensor = StepTensors::given(st.momentum_tensor);
  const bool need_buf = m_tensor || momentum != 0;
  TORCH_CHECK(!nesterov || need_buf, "nesterov=True needs momentum != 0, got momentum=",
              momentum);
  TORCH_CHECK(!first_step || need_buf,
              "first_step=True (buffer = gradient) needs momentum != 0, got momentum=", momentum);
  TORCH_CHECK(!StepTensors::given(st.first_step_tensor) || first_step,
              "first_step_tensor is given with first_step=False: it decides a first step, which "
              "first_step=True allows");
  TORCH_CHECK(grads.size() == params.size(), "grads has ", grads.size(), " tensors but params has ",
              params.size());
  TORCH_CHECK(!need_buf || bufs.size() == params.size(), "momentum_buffers has ", bufs.size(),
              " tensors but params has ", params.size(), " (momentum=", momentum, " needs one each)");

  std::optional<at::ScalarType> dtype;
  std::optional<at::Device> device;
  for (size_t i = 0; i < params.size(); ++i) {
    check_triple(At{single ? -1 : static_cast<int64_t>(i)}, params[i], grads[i],
                 need_buf ? &bufs[i] : nullptr, device_type, dtype, device);
  }
  if (params.empty()) return;
  if (!segments.defined() && params.size() > 1) {
    check_no_cross_overlap({{params, "params"}, {grads, "grads"},
                            {need_buf ? bufs : at::TensorList(), "momentum_buffers"}});
  }
  check_tensors(st, *device, *dtype);

  // Each tensor is one span; a flat step (segments given) makes one span per segment.
  std::vector<Span> spans;
  const auto add_span = [&](size_t i, int64_t offset, int64_t numel) {
    if (numel == 0) return;
    const int64_t bytes = offset * static_cast<int64_t>(params[i].element_size());
    const auto at = [bytes](const at::Tensor& t) { return static_cast<char*>(t.data_ptr()) + bytes; };
    spans.push_back(Span{at(params[i]), need_buf ? at(bufs[i]) : nullptr, at(grads[i]), numel});
  };
  if (segments.defined()) {
    const int64_t* seg = segments.data_ptr<int64_t>();
    spans.reserve(segments.size(0));
    for (int64_t j = 0; j < segments.size(0); ++j) add_span(0, seg[2 * j], seg[2 * j + 1]);
  } else {
    spans.reserve(params.size());
    for (size_t i = 0; i < params.size(); ++i) add_span(i, 0, params[i].numel());
  }
  StepHyper hyper{lr, momentum, dampening, weight_decay, 0u, AmpPtrs{}, HyperPtrs{}};
  if (device_type == c10::DeviceType::CPU) {  // host memory: read here, no sync
    if (StepTensors::given(st.first_step_tensor)) {
      first_step = *st.first_step_tensor->data_ptr<bool>();
    }
  } else {
    hyper.amp = AmpPtrs{device_scalar(st.grad_scale).f32, device_scalar(st.found_inf).f32,
                        StepTensors::given(st.clip_coef) ? st.clip_coef->data_ptr() : nullptr,
                        StepTensors::given(st.first_step_tensor)
                            ? st.first_step_tensor->data_ptr<bool>()
                            : nullptr};
  }
  resolve_hyper(hyper, st, device_type, need_buf, maximize, nesterov, first_step);
  if (device_type == c10::DeviceType::CPU && st.any() && amp_on_host(st, spans, params[0])) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, *dtype, "momentum_cuda_sgd_step", [&] {
    if (device_type == c10::DeviceType::CPU) {
      sgd_step_cpu<scalar_t>(spans.data(), static_cast<int64_t>(spans.size()), hyper);
    } else {
#ifdef MOMENTUM_CUDA_WITH_CUDA
      if (spans.empty()) return;
      // One span: the flat kernel. Several: the multi-tensor kernel, exact to the segments.
      // (The optimizer passes one segment covering a whole run, padding included: it owns the
      // padding, which is zero in param, grad and buffer and stays zero.)
      launch_cuda<scalar_t>(spans, spans.size() == 1, hyper, *device);
#endif
    }
  });
}

/// Flat step: params, grads and buffers of many tensors live in three 1-D buffers at the same
/// offsets; `segments` ([k, 2] int64: offset, numel) lists the tensors, in increasing offset order.
/// One call, one parallel region. Each segment keeps its own identity because torch's bf16/fp16
/// arithmetic depends on an element's position inside its tensor (csrc/cpu/momentum_cpu.cpp).
void sgd_step_flat(const at::Tensor& param, const at::Tensor& grad,
                   const std::optional<at::Tensor>& buf, const at::Tensor& segments, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov,
                   bool maximize, bool first_step, c10::DeviceType device_type, const StepTensors& st) {
  const bool need_buf = momentum != 0 || StepTensors::given(st.momentum_tensor);
  TORCH_CHECK(!need_buf || (buf.has_value() && buf->defined()),
              "momentum_buffer is None but momentum=", momentum, " needs one");
  for (const auto& [t, n] : {std::pair<const at::Tensor*, const char*>{&param, "param"},
                             {&grad, "grad"}, {need_buf ? &*buf : &param, "momentum_buffer"}}) {
    TORCH_CHECK(t->defined(), n, " is undefined (None)");
    TORCH_CHECK(t->layout() == at::kStrided, n, " must be a dense (strided) tensor, got layout ",
                t->layout());
    TORCH_CHECK(t->dim() == 1 && t->is_contiguous(), n,
                " of a flat step must be a contiguous 1-D tensor, got ", describe(*t),
                " with strides ", c10::str(t->strides()));
  }
  TORCH_CHECK(segments.defined() && segments.device().is_cpu() &&
                  segments.scalar_type() == at::kLong && segments.dim() == 2 &&
                  segments.size(1) == 2 && segments.is_contiguous(),
              "segments must be a contiguous CPU int64 tensor of shape [k, 2], got ",
              segments.defined() ? describe(segments) : std::string("None"));
  const int64_t k = segments.size(0);
  const int64_t* seg = segments.data_ptr<int64_t>();
  int64_t end = 0;
  for (int64_t i = 0; i < k; ++i) {
    // Written so that no sum can overflow int64.
    TORCH_CHECK(seg[2 * i] >= end && seg[2 * i] <= param.numel() && seg[2 * i + 1] >= 0 &&
                    seg[2 * i + 1] <= param.numel() - seg[2 * i],
                "segments[", i, "] = (", seg[2 * i], ", ", seg[2 * i + 1],
                ") must lie inside the flat buffer of ", param.numel(),
                " elements, after the previous segment (which ends at ", end, ")");
    end = seg[2 * i] + seg[2 * i + 1];
  }
  // The triple check on the whole buffers covers dtype, device, sizes and overlap.
  const at::Tensor p[] = {param}, g[] = {grad};
  const at::Tensor b[] = {need_buf ? *buf : at::Tensor()};
  sgd_step_list(p, g, at::TensorList(b, need_buf ? 1 : 0), lr, momentum, dampening,
                weight_decay, nesterov, maximize, first_step, device_type, /*single=*/true,
                segments, st);
}

/// The ops' implementation for one device type (registered per dispatch key below).
template <c10::DeviceType D>
void step_flat_(const at::Tensor& param, const at::Tensor& grad,
                const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& segments,
                double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                bool maximize, bool first_step, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& lr_tensor,
                const std::optional<at::Tensor>& clip_coef,
                const std::optional<at::Tensor>& momentum_tensor,
                const std::optional<at::Tensor>& dampening_tensor,
                const std::optional<at::Tensor>& weight_decay_tensor,
                const std::optional<at::Tensor>& first_step_tensor) {
  sgd_step_flat(param, grad, momentum_buffer, segments, lr, momentum, dampening, weight_decay,
                nesterov, maximize, first_step, D,
                StepTensors{grad_scale, found_inf, lr_tensor, clip_coef, momentum_tensor,
                            dampening_tensor, weight_decay_tensor, first_step_tensor});
}

template <c10::DeviceType D>
void step_list_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                bool maximize, bool first_step, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& lr_tensor,
                const std::optional<at::Tensor>& clip_coef,
                const std::optional<at::Tensor>& momentum_tensor,
                const std::optional<at::Tensor>& dampening_tensor,
                const std::optional<at::Tensor>& weight_decay_tensor,
                const std::optional<at::Tensor>& first_step_tensor) {
  sgd_step_list(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                maximize, first_step, D, /*single=*/false, at::Tensor(),
                StepTensors{grad_scale, found_inf, lr_tensor, clip_coef, momentum_tensor,
                            dampening_tensor, weight_decay_tensor, first_step_tensor});
}

/// What the per-tensor ops of the modes (master weights, stochastic rounding, momentum_dtype)
/// check alike, before anything is written: the scalars, that every list in `lists` has one
/// tensor per parameter (momentum_buffers only with momentum), and each parameter a dense
/// `param_dtype` tensor of `device_type` with a gradient like it (and, given like_bufs, a
/// buffer like it). Returns whether the step has momentum (and so buffers).
bool check_mode_step(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                     NamedLists lists, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool first_step, bool like_bufs,
                     const char* why, c10::DeviceType device_type, const StepTensors& st,
                     at::ScalarType param_dtype = at::kBFloat16) {  // or kFloat, kHalf
  check_scalar("lr", lr);
  check_scalar("momentum", momentum);
  check_scalar("dampening", dampening);
  check_scalar("weight_decay", weight_decay);
  // a momentum tensor is read where it lives: the buffers are given, its value decides
  const bool need_buf = momentum != 0 || StepTensors::given(st.momentum_tensor);
  TORCH_CHECK(!nesterov || need_buf, "nesterov=True needs momentum != 0, got momentum=",
              momentum);
  TORCH_CHECK(!first_step || need_buf,
              "first_step=True (buffer = gradient) needs momentum != 0, got momentum=", momentum);
  for (const auto& [list, name] : lists) {
    TORCH_CHECK(list.size() == params.size(), name, " has ", list.size(),
                " tensors but params has ", params.size());
  }
  TORCH_CHECK(!need_buf || bufs.size() == params.size(), "momentum_buffers has ", bufs.size(),
              " tensors but params has ", params.size(), " (momentum=", momentum,
              " needs one each)");
  std::optional<at::ScalarType> dtype;
  std::optional<at::Device> device;
  for (size_t i = 0; i < params.size(); ++i) {
    const At at_i{static_cast<int64_t>(i)};
    check_triple(at_i, params[i], grads[i], need_buf && like_bufs ? &bufs[i] : nullptr,
                 device_type, dtype, device);
    TORCH_CHECK(params[i].scalar_type() == param_dtype, "params", at_i, " must be ",
                param_dtype == at::kFloat  ? "float32"
                : param_dtype == at::kHalf ? "float16"
                                           : "bfloat16",
                " (", why, "), got ",
                describe(params[i]));
  }
  return need_buf;
}

/// t must be a `want` tensor laid out like params[i] (p: same_layout), on its device.
void check_like_param(const at::Tensor& t, const at::Tensor& p, const char* name, At at_i,
                      at::ScalarType want) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided && t.device() == p.device() &&
                  t.scalar_type() == want && same_layout(t, p),
              name, at_i, " must be a ", c10::toString(want), " tensor on ", p.device(),
              " with the shape ", c10::str(p.sizes()), " and strides ", c10::str(p.strides()),
              " of params", at_i, " (on every dimension of size > 1), got ",
              t.defined() ? describe(t) + " with strides " + c10::str(t.strides())
                          : std::string("None"));
}

/// The tensors a mode op takes: GradScaler's found_inf (not the stochastic-rounding op's) and
/// the hyper-parameters held in tensors.
StepTensors mode_tensors(const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& lr_tensor,
                         const std::optional<at::Tensor>& momentum_tensor,
                         const std::optional<at::Tensor>& dampening_tensor,
                         const std::optional<at::Tensor>& weight_decay_tensor) {
  return StepTensors{kNone, found_inf, lr_tensor, kNone, momentum_tensor, dampening_tensor,
                     weight_decay_tensor, kNone};
}

/// Runs a per-tensor mode op's kernel: `cuda(stream)` on the parameters' device and current
/// stream (a launch error raises, naming `kernel`), else `cpu()`. st's tensors (mode_tensors)
/// are checked here, after every other argument, and read as resolve_hyper reads them (on the
/// CPU here, on CUDA by the kernel). found_inf != 0, NaN included, skips the step: on CUDA the
/// kernel reads it (hyper.amp.found_inf, no host sync), on the CPU it is read here (host
/// memory) and nothing runs.
template <class Cuda, class Cpu>
void run_mode_step(const at::Tensor& p0, c10::DeviceType device_type, const char* kernel,
                   const StepTensors& st, StepHyper& hyper, bool need_buf, bool maximize,
                   bool nesterov, bool first_step, Cuda&& cuda, Cpu&& cpu) {
  const auto& found_inf = st.found_inf;
  const bool amp = StepTensors::given(found_inf);
  check_tensors(st, p0.device(), p0.scalar_type());
  resolve_hyper(hyper, st, device_type, need_buf, maximize, nesterov, first_step);
#ifdef MOMENTUM_CUDA_WITH_CUDA
  if (device_type == c10::DeviceType::CUDA) {
    hyper.amp.found_inf = amp ? found_inf->data_ptr<float>() : nullptr;
    const c10::cuda::CUDAGuard guard(p0.device());
    const cudaError_t err = cuda(c10::cuda::getCurrentCUDAStream(p0.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, "momentum_cuda: CUDA launch failed (", kernel, "): ",
                cudaGetErrorString(err));
    return;
  }
#else
  (void)device_type, (void)kernel, (void)cuda;
#endif
  if (amp && found_inf->item<float>() != 0.f) return;
  cpu();
}

/// The master-weights step (sgd_step_master_list_): bf16 parameters whose fp32 masters are
/// split as bf16_split.h says, fp32 momentum buffers, int16 remainders and uint8 tie bytes (8
/// elements each). Every tensor is checked before any is written.
void sgd_step_master_list(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                          at::TensorList rems, at::TensorList ties, double lr, double momentum,
                          double dampening, double weight_decay, bool nesterov, bool maximize,
                          bool first_step, const StepTensors& st, c10::DeviceType device_type) {
  const bool need_buf = check_mode_step(
      params, grads, bufs, {{grads, "grads"}, {rems, "remainders"}, {ties, "ties"}}, lr,
      momentum, dampening, weight_decay, nesterov, first_step, /*like_bufs=*/false,
      "master weights split a bf16 parameter", device_type, st);
  for (size_t i = 0; i < params.size(); ++i) {
    const At at_i{static_cast<int64_t>(i)};
    const at::Tensor& p = params[i];
    if (need_buf) check_like_param(bufs[i], p, "momentum_buffers", at_i, at::kFloat);
    check_like_param(rems[i], p, "remainders", at_i, at::kShort);
    const at::Tensor& t = ties[i];
    const int64_t bytes = (p.numel() + 7) / 8;
    TORCH_CHECK(t.defined() && t.layout() == at::kStrided && t.device() == p.device() &&
                    t.scalar_type() == at::kByte && t.dim() == 1 && t.numel() == bytes &&
                    t.is_contiguous(),
                "ties", at_i, " must be a contiguous 1-D uint8 tensor of ", bytes,
                " bytes (a bit per element of params", at_i, "), got ",
                t.defined() ? describe(t) : std::string("None"));
  }
  if (params.empty()) return;
  check_no_cross_overlap({{params, "params"}, {grads, "grads"},
                          {need_buf ? bufs : at::TensorList(), "momentum_buffers"},
                          {rems, "remainders"}, {ties, "ties"}});
  std::vector<MasterSpan> spans;
  spans.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    spans.push_back(MasterSpan{static_cast<uint16_t*>(params[i].data_ptr()),
                               need_buf ? bufs[i].data_ptr<float>() : nullptr,
                               static_cast<const uint16_t*>(grads[i].data_ptr()),
                               static_cast<uint16_t*>(rems[i].data_ptr()),
                               ties[i].data_ptr<uint8_t>(), params[i].numel()});
  }
  StepHyper hyper{lr, momentum, dampening, weight_decay, 0u, AmpPtrs{}, HyperPtrs{}};
  const auto n = static_cast<int64_t>(spans.size());
  run_mode_step(
      params[0], device_type, "master kernel", st, hyper, need_buf, maximize, nesterov,
      first_step,
      [&](auto stream) { return sgd_step_master_cuda(spans.data(), n, hyper, stream); },
      [&] { sgd_step_master_cpu(spans.data(), n, hyper); });
}

/// The stochastic-rounding step (sgd_step_sr_list_, stochastic.h): bf16 parameters, gradients
/// and momentum buffers; keys[i] (0 .. 2^32 - 1) seeds params[i]'s random bits, those of the
/// indices offsets[i] .. offsets[i] + numel - 1 (a shard's place in its whole tensor; all 0
/// when offsets is absent). Every tensor is checked before any is written.
void sgd_step_sr_list(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                      c10::ArrayRef<int64_t> keys, double lr, double momentum, double dampening,
                      double weight_decay, bool nesterov, bool maximize, bool first_step,
                      at::OptionalIntArrayRef offsets, const StepTensors& st,
                      c10::DeviceType device_type) {
  TORCH_CHECK(keys.size() == params.size(), "keys has ", keys.size(),
              " entries but params has ", params.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    TORCH_CHECK(keys[i] >= 0 && keys[i] <= 0xFFFFFFFFll, "keys[", i,
                "] must be in [0, 2^32), got ", keys[i]);
  }
  const bool need_buf = check_mode_step(
      params, grads, bufs, {{grads, "grads"}}, lr, momentum, dampening, weight_decay, nesterov,
      first_step, /*like_bufs=*/true, "stochastic rounding rounds to bf16", device_type, st);
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->size() == params.size(), "offsets has ", offsets->size(),
                " entries but params has ", params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const int64_t o = (*offsets)[i];
      TORCH_CHECK(o >= 0 && o <= std::numeric_limits<int64_t>::max() - params[i].numel(),
                  "offsets[", i, "] must be in [0, 2^63 - numel], got ", o);
    }
  }
  if (params.empty()) return;
  check_no_cross_overlap({{params, "params"}, {grads, "grads"},
                          {need_buf ? bufs : at::TensorList(), "momentum_buffers"}});
  std::vector<SrSpan> spans;
  spans.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    spans.push_back(SrSpan{static_cast<uint16_t*>(params[i].data_ptr()),
                           need_buf ? static_cast<uint16_t*>(bufs[i].data_ptr()) : nullptr,
                           static_cast<const uint16_t*>(grads[i].data_ptr()),
                           static_cast<uint32_t>(keys[i]), params[i].numel(),
                           offsets.has_value() ? (*offsets)[i] : 0});
  }
  StepHyper hyper{lr, momentum, dampening, weight_decay, 0u, AmpPtrs{}, HyperPtrs{}};
  const auto n = static_cast<int64_t>(spans.size());
  run_mode_step(
      params[0], device_type, "stochastic-rounding kernel", st, hyper, need_buf, maximize,
      nesterov, first_step,
      [&](auto stream) { return sgd_step_sr_cuda(spans.data(), n, hyper, stream); },
      [&] { sgd_step_sr_cpu(spans.data(), n, hyper); });
}

/// The fp16 master-weights step (sgd_step_fp16_master_list_, fp16_master.h): fp16 parameters
/// and gradients, fp32 momentum buffers and fp32 masters shaped and strided like their
/// parameters. Every tensor is checked before any is written.
void sgd_step_fp16_master_list(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                               at::TensorList masters, double lr, double momentum,
                               double dampening, double weight_decay, bool nesterov,
                               bool maximize, bool first_step, const StepTensors& st,
                               c10::DeviceType device_type) {
  const bool need_buf = check_mode_step(
      params, grads, bufs, {{grads, "grads"}, {masters, "masters"}}, lr, momentum, dampening,
      weight_decay, nesterov, first_step, /*like_bufs=*/false,
      "fp16 master weights keep an fp32 copy of a float16 parameter", device_type, st,
      at::kHalf);
  for (size_t i = 0; i < params.size(); ++i) {
    const At at_i{static_cast<int64_t>(i)};
    if (need_buf) check_like_param(bufs[i], params[i], "momentum_buffers", at_i, at::kFloat);
    check_like_param(masters[i], params[i], "masters", at_i, at::kFloat);
  }
  if (params.empty()) return;
  check_no_cross_overlap({{params, "params"}, {grads, "grads"},
                          {need_buf ? bufs : at::TensorList(), "momentum_buffers"},
                          {masters, "masters"}});
  std::vector<Fp16MasterSpan> spans;
  spans.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    spans.push_back(Fp16MasterSpan{static_cast<uint16_t*>(params[i].data_ptr()),
                                   masters[i].data_ptr<float>(),
                                   need_buf ? bufs[i].data_ptr<float>() : nullptr,
                                   static_cast<const uint16_t*>(grads[i].data_ptr()),
                                   params[i].numel()});
  }
  StepHyper hyper{lr, momentum, dampening, weight_decay, 0u, AmpPtrs{}, HyperPtrs{}};
  const auto n = static_cast<int64_t>(spans.size());
  run_mode_step(
      params[0], device_type, "fp16 master kernel", st, hyper, need_buf, maximize, nesterov,
      first_step,
      [&](auto stream) { return sgd_step_fp16_master_cuda(spans.data(), n, hyper, stream); },
      [&] { sgd_step_fp16_master_cpu(spans.data(), n, hyper); });
}

/// The momentum_dtype step (sgd_step_qmom_list_, momentum_dtype.h): fp32 parameters and
/// gradients; momentum buffers shaped and strided like their parameters, bf16 (scales empty)
/// or int8 codes (scales: a contiguous 1-D fp32 tensor of ceil(numel / 256) block scales per
/// parameter). Every tensor is checked before any is written.
void sgd_step_qmom_list(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                        at::TensorList scales, double lr, double momentum, double dampening,
                        double weight_decay, bool nesterov, bool maximize, bool first_step,
                        const StepTensors& st, c10::DeviceType device_type) {
  const bool need_buf = check_mode_step(
      params, grads, bufs, {{grads, "grads"}}, lr, momentum, dampening, weight_decay, nesterov,
      first_step, /*like_bufs=*/false, "momentum_dtype keeps float32 parameters", device_type,
      st, at::kFloat);
  const bool int8 = !scales.empty();
  TORCH_CHECK(!int8 || need_buf, "scales has ", scales.size(),
              " tensors but momentum=0 has no momentum buffers to scale");
  TORCH_CHECK(!int8 || scales.size() == params.size(), "scales has ", scales.size(),
              " tensors but params has ", params.size(),
              " (int8 momentum buffers need one each; bf16 ones none)");
  const auto buf_dtype = int8 ? at::kChar : at::kBFloat16;
  for (size_t i = 0; need_buf && i < params.size(); ++i) {
    const At at_i{static_cast<int64_t>(i)};
    const at::Tensor& p = params[i];
    check_like_param(bufs[i], p, "momentum_buffers", at_i, buf_dtype);
    if (!int8) continue;
    const at::Tensor& sc = scales[i];
    const int64_t blocks = (p.numel() + kQBlock - 1) / kQBlock;
    TORCH_CHECK(sc.defined() && sc.layout() == at::kStrided && sc.device() == p.device() &&
                    sc.scalar_type() == at::kFloat && sc.dim() == 1 && sc.numel() == blocks &&
                    sc.is_contiguous(),
                "scales", at_i, " must be a contiguous 1-D float32 tensor of ", blocks,
                " block scales (one per ", kQBlock, " elements of params", at_i, ") on ",
                p.device(), ", got ", sc.defined() ? describe(sc) : std::string("None"));
  }
  if (params.empty()) return;
  check_no_cross_overlap({{params, "params"}, {grads, "grads"},
                          {need_buf ? bufs : at::TensorList(), "momentum_buffers"},
                          {scales, "scales"}});
  StepHyper hyper{lr, momentum, dampening, weight_decay, 0u, AmpPtrs{}, HyperPtrs{}};
  if (int8) {
    std::vector<Q8Span> spans;
    spans.reserve(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].numel() == 0) continue;
      spans.push_back(Q8Span{params[i].data_ptr<float>(), bufs[i].data_ptr<int8_t>(),
                             grads[i].data_ptr<float>(), scales[i].data_ptr<float>(),
                             params[i].numel()});
    }
    const auto n = static_cast<int64_t>(spans.size());
    run_mode_step(
        params[0], device_type, "int8-momentum kernel", st, hyper, need_buf, maximize,
        nesterov, first_step,
        [&](auto stream) { return sgd_step_q8_cuda(spans.data(), n, hyper, stream); },
        [&] { sgd_step_q8_cpu(spans.data(), n, hyper); });
    return;
  }
  std::vector<Bf16MomSpan> spans;
  spans.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    spans.push_back(Bf16MomSpan{params[i].data_ptr<float>(),
                                need_buf ? static_cast<uint16_t*>(bufs[i].data_ptr()) : nullptr,
                                grads[i].data_ptr<float>(), params[i].numel()});
  }
  const auto n = static_cast<int64_t>(spans.size());
  run_mode_step(
      params[0], device_type, "bf16-momentum kernel", st, hyper, need_buf, maximize, nesterov,
      first_step,
      [&](auto stream) { return sgd_step_bf16mom_cuda(spans.data(), n, hyper, stream); },
      [&] { sgd_step_bf16mom_cpu(spans.data(), n, hyper); });
}

/// Which arguments of an op's schema it writes, read once from the schema (by the annotations
/// (a!), (b!), (c!)), not at every call.
struct WrittenArgs {
  std::vector<size_t> always;  // params and momentum buffers
  std::vector<size_t> grads;   // written only when grad_scale or clip_coef is given
  std::optional<size_t> grad_scale, clip_coef;  // absent from the master op's schema
  explicit WrittenArgs(const c10::FunctionSchema& schema) {
    const auto& args = schema.arguments();
    for (size_t i = 0; i < args.size(); ++i) {
      if (args[i].alias_info() == nullptr || !args[i].alias_info()->isWrite()) continue;
      const bool grad = args[i].name() == "grad" || args[i].name() == "grads";
      (grad ? grads : always).push_back(i);
    }
    grad_scale = schema.argumentIndexWithName("grad_scale");
    clip_coef = schema.argumentIndexWithName("clip_coef");
  }
};

/// What ATen's in-place ops do at the ADInplaceOrView key: once the kernel has run (not if it
/// raised), the version counter of every tensor it wrote goes up, so that autograd refuses a
/// tensor saved for backward and then stepped. The gradients are written only when grad_scale
/// or clip_coef is given (as GradScaler.unscale_ and clip_grad_norm_ write them); otherwise they
/// keep their versions, as torch.optim.SGD(foreach=False) leaves them. kOp: one instance (and
/// so one WrittenArgs) per op.
template <int kOp>
void bump_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                  torch::jit::Stack* stack) {
  static const WrittenArgs w(op.schema());
  const size_t first = stack->size() - op.schema().arguments().size();
  const auto arg = [&](size_t i) -> const c10::IValue& { return (*stack)[first + i]; };
  const bool grads_written = (w.grad_scale && arg(*w.grad_scale).isTensor()) ||
                             (w.clip_coef && arg(*w.clip_coef).isTensor());
  c10::SmallVector<c10::IValue, 3> written;
  for (size_t i : w.always) written.push_back(arg(i));
  if (grads_written) {
    for (size_t i : w.grads) written.push_back(arg(i));
  }
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& v : written) {
    if (v.isTensor()) {
      torch::autograd::impl::bump_version(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) torch::autograd::impl::bump_version(t);
    }
  }
}

/// The dispatcher's choice when no dense cpu or cuda tensor decides the call: empty lists (a
/// no-op after the checks), sparse tensors, or devices momentum_cuda has no kernel for. The
/// first tensor's device type picks the implementation whose checks name the bad argument.
c10::DeviceType device_of(std::initializer_list<at::TensorList> lists) {
  for (const auto& list : lists) {
    for (const auto& t : list) {
      if (!t.defined()) continue;
      const auto type = t.device().type();
#ifdef MOMENTUM_CUDA_WITH_CUDA
      if (type == c10::DeviceType::CUDA) return type;
#endif
      TORCH_CHECK(type == c10::DeviceType::CPU, "momentum_cuda has no kernel for ", describe(t),
                  " (its kernels run on cpu", kWithCuda ? " and cuda" : "", " tensors)");
      return type;
    }
  }
  return c10::DeviceType::CPU;
}

void step_flat_other_(const at::Tensor& param, const at::Tensor& grad,
                      const std::optional<at::Tensor>& momentum_buffer,
                      const at::Tensor& segments, double lr, double momentum, double dampening,
                      double weight_decay, bool nesterov, bool maximize, bool first_step,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& lr_tensor,
                      const std::optional<at::Tensor>& clip_coef,
                      const std::optional<at::Tensor>& momentum_tensor,
                      const std::optional<at::Tensor>& dampening_tensor,
                      const std::optional<at::Tensor>& weight_decay_tensor,
                      const std::optional<at::Tensor>& first_step_tensor) {
  const auto type = device_of({param, grad});
  sgd_step_flat(param, grad, momentum_buffer, segments, lr, momentum, dampening, weight_decay,
                nesterov, maximize, first_step, type,
                StepTensors{grad_scale, found_inf, lr_tensor, clip_coef, momentum_tensor,
                            dampening_tensor, weight_decay_tensor, first_step_tensor});
}

void step_list_other_(at::TensorList params, at::TensorList grads,
                      at::TensorList momentum_buffers, double lr, double momentum,
                      double dampening, double weight_decay, bool nesterov, bool maximize,
                      bool first_step, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& lr_tensor,
                      const std::optional<at::Tensor>& clip_coef,
                      const std::optional<at::Tensor>& momentum_tensor,
                      const std::optional<at::Tensor>& dampening_tensor,
                      const std::optional<at::Tensor>& weight_decay_tensor,
                      const std::optional<at::Tensor>& first_step_tensor) {
  const auto type = device_of({params, grads, momentum_buffers});
  sgd_step_list(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                maximize, first_step, type, /*single=*/false, at::Tensor(),
                StepTensors{grad_scale, found_inf, lr_tensor, clip_coef, momentum_tensor,
                            dampening_tensor, weight_decay_tensor, first_step_tensor});
}

void step_master_list_(at::TensorList params, at::TensorList grads,
                       at::TensorList momentum_buffers, at::TensorList remainders,
                       at::TensorList ties, double lr, double momentum, double dampening,
                       double weight_decay, bool nesterov, bool maximize, bool first_step,
                       const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& momentum_tensor,
                       const std::optional<at::Tensor>& dampening_tensor,
                       const std::optional<at::Tensor>& weight_decay_tensor) {
  sgd_step_master_list(params, grads, momentum_buffers, remainders, ties, lr, momentum,
                       dampening, weight_decay, nesterov, maximize, first_step,
                       mode_tensors(found_inf, lr_tensor, momentum_tensor, dampening_tensor,
                                    weight_decay_tensor),
                       device_of({params, grads, momentum_buffers, remainders, ties}));
}

void step_fp16_master_list_(at::TensorList params, at::TensorList grads,
                            at::TensorList momentum_buffers, at::TensorList masters, double lr,
                            double momentum, double dampening, double weight_decay,
                            bool nesterov, bool maximize, bool first_step,
                            const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& momentum_tensor,
                       const std::optional<at::Tensor>& dampening_tensor,
                       const std::optional<at::Tensor>& weight_decay_tensor) {
  sgd_step_fp16_master_list(params, grads, momentum_buffers, masters, lr, momentum, dampening,
                            weight_decay, nesterov, maximize, first_step,
                            mode_tensors(found_inf, lr_tensor, momentum_tensor,
                                         dampening_tensor, weight_decay_tensor),
                            device_of({params, grads, momentum_buffers, masters}));
}

void step_qmom_list_(at::TensorList params, at::TensorList grads,
                     at::TensorList momentum_buffers, at::TensorList scales, double lr,
                     double momentum, double dampening, double weight_decay, bool nesterov,
                     bool maximize, bool first_step, const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& momentum_tensor,
                       const std::optional<at::Tensor>& dampening_tensor,
                       const std::optional<at::Tensor>& weight_decay_tensor) {
  sgd_step_qmom_list(params, grads, momentum_buffers, scales, lr, momentum, dampening,
                     weight_decay, nesterov, maximize, first_step,
                     mode_tensors(found_inf, lr_tensor, momentum_tensor, dampening_tensor,
                                  weight_decay_tensor),
                     device_of({params, grads, momentum_buffers, scales}));
}

void step_sr_list_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   c10::ArrayRef<int64_t> keys, double lr, double momentum, double dampening,
                   double weight_decay, bool nesterov, bool maximize, bool first_step,
                   at::OptionalIntArrayRef offsets,
                       const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& momentum_tensor,
                       const std::optional<at::Tensor>& dampening_tensor,
                       const std::optional<at::Tensor>& weight_decay_tensor) {
  sgd_step_sr_list(params, grads, momentum_buffers, keys, lr, momentum, dampening, weight_decay,
                   nesterov, maximize, first_step, offsets,
                   mode_tensors(kNone, lr_tensor, momentum_tensor, dampening_tensor,
                                weight_decay_tensor),
                   device_of({params, grads, momentum_buffers}));
}

/// t is read as its memory holds it: no negative or conjugate view bit (torch's ops resolve
/// those; the kernels read raw memory), not a ZeroTensor (no memory at all).
bool plain(const at::Tensor& t) {
  return !t.is_neg() && !t.is_conj() && !t._is_zerotensor();
}

/// For the optimizer's per-tensor planning (optim._plan), one call for all of a group's loose
/// (param, grad, buffer or None) triples: whether the kernels take each as it is. True only
/// where optim._check_loose returns None without raising (the same conditions, written again
/// here in C++ because they run for every parameter at every step); false sends the triple to
/// _check_loose, which names the problem or picks torch's own ops.
std::vector<bool> kernel_ready(const std::vector<at::Tensor>& params,
                               const std::vector<at::Tensor>& grads,
                               const std::vector<std::optional<at::Tensor>>& bufs) {
  TORCH_CHECK(grads.size() == params.size() && bufs.size() == params.size(),
              "kernel_ready: params, grads and bufs must have one entry each, got ",
              params.size(), ", ", grads.size(), " and ", bufs.size());
  std::vector<bool> ready(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const at::Tensor* b = bufs[i].has_value() && bufs[i]->defined() ? &*bufs[i] : nullptr;
    const auto st = p.scalar_type();
    const bool narrow = st == at::kBFloat16 || st == at::kHalf;
    const auto like = [&](const at::Tensor& t) {
      return t.layout() == at::kStrided && t.sizes() == p.sizes() && t.device() == p.device() &&
             t.scalar_type() == st;
    };
    // optim._walked_alike: laid out like p, and for bf16/fp16 walked by torch's ops as p is
    const auto alike = [&](const at::Tensor& t) {
      return same_layout(t, p) &&
             (!narrow || t.strides() == p.strides() || p.is_contiguous() ||
              p.is_contiguous(at::MemoryFormat::ChannelsLast));
    };
    // A gradient in another layout is copied into p's (fp32/fp64: the bits do not depend
    // on it), but not without a buffer (a first step: torch's buffer is the gradient's clone,
    // in its layout; or no momentum) nor when it overlaps itself (torch's ops treat a
    // broadcast operand apart, with bits that depend on position): _check_loose decides.
    ready[i] = p.layout() == at::kStrided && !p.device().is_meta() &&
               (st == at::kFloat || st == at::kDouble || narrow) && plain(p) && plain(g) &&
               (b == nullptr || plain(*b)) &&
               (p.is_contiguous() || p.is_non_overlapping_and_dense()) && like(g) &&
               (narrow ? alike(g) : b != nullptr || same_layout(g, p)) &&
               (g.is_non_overlapping_and_dense() ||
                at::has_internal_overlap(g) == at::MemOverlap::No) &&
               (b == nullptr || (like(*b) && alike(*b)));
  }
  return ready;
}

/// Whether no two strided tensors among the lists share memory (one sort of their byte
/// ranges): the gradients of a replayed step's list calls under GradScaler, whose kernels
/// write them back unscaled, call after call (optim._step_steady).
bool apart(const std::vector<std::vector<at::Tensor>>& lists) {
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (const auto& list : lists) {
    for (const auto& t : list) {
      if (!t.defined() || t.layout() != at::kStrided || t.numel() == 0) continue;
      int64_t last = 0;  // the farthest element's offset, in elements
      for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
      const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
      spans.push_back({lo, lo + static_cast<uintptr_t>((last + 1) * t.element_size())});
    }
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first < spans[i - 1].second) return false;
  }
  return true;
}

/// dict[key] (borrowed; nullptr if absent or on an error) for a key whose hash is known:
/// Tensor.__hash__ is a Python method (id(self)), hashed once when a check is made.
PyObject* dict_lookup(PyObject* dict, PyObject* key, Py_hash_t hash) {
#if PY_VERSION_HEX < 0x030E0000
  return _PyDict_GetItem_KnownHash(dict, key, hash);
#else
  (void)hash;
  return PyDict_GetItemWithError(dict, key);
#endif
}

/// The hashes of `objects` (Python's hash(), which raises for an unhashable one).
std::vector<Py_hash_t> hashes_of(const std::vector<pybind11::object>& objects) {
  std::vector<Py_hash_t> out;
  out.reserve(objects.size());
  for (const auto& o : objects) {
    const Py_hash_t h = PyObject_Hash(o.ptr());
    if (h == -1) throw pybind11::error_already_set();
    out.push_back(h);
  }
  return out;
}

/// The flat path's per-step check of one bucket (optim._whole_bucket_run) in one call: every
/// parameter still at its address, with its flat gradient view as .grad, the view still at its
/// address. It keeps the Python objects, as the bucket does, and reads each one's current tensor
/// at every check: holding the tensors themselves would raise their use count, which
/// torch.utils.swap_tensors refuses, and would miss a swap. The bucket makes a new one when a
/// view is replaced.
class BucketCheck {
  using Weak = c10::weak_intrusive_ptr<c10::StorageImpl>;

 public:
  /// ptrs, gptrs: the addresses the parameters and gradient views had when laid out, in
  /// flat_param's and flat_grad's storages. Those are held weakly: their StorageImpl addresses
  /// cannot be reused while this compares them, and their use counts, which optim._alone
  /// reads, stay as they are.
  /// meta: each parameter's (sizes, strides) when laid out, which its gradient and buffer
  /// views share; all have flat_param's dtype.
  BucketCheck(std::vector<pybind11::object> params, std::vector<pybind11::object> views,
              const std::vector<int64_t>& ptrs, const std::vector<int64_t>& gptrs,
              const at::Tensor& flat_param, const at::Tensor& flat_grad,
              const std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>>& meta)
      : params_(std::move(params)), views_(std::move(views)), dtype_(flat_param.dtype()),
        pstore_(flat_param.storage().getWeakStorageImpl()),
        gstore_(flat_grad.storage().getWeakStorageImpl()),
        pdata_(flat_param.storage().data()), gdata_(flat_grad.storage().data()),
        pbytes_(flat_param.storage().nbytes()), gbytes_(flat_grad.storage().nbytes()) {
    TORCH_CHECK(views_.size() == params_.size() && ptrs.size() == params_.size() &&
                    gptrs.size() == params_.size() && meta.size() == params_.size(),
                "BucketCheck: one view, address, gradient address and (sizes, strides) per "
                "parameter");
    for (const auto& [sizes, strides] : meta) {
      TORCH_CHECK(sizes.size() == strides.size(), "BucketCheck: sizes and strides of one rank");
      meta_at_.push_back(static_cast<int64_t>(meta_.size()));
      meta_.push_back(static_cast<int64_t>(sizes.size()));
      meta_.insert(meta_.end(), sizes.begin(), sizes.end());
      meta_.insert(meta_.end(), strides.begin(), strides.end());
    }
    for (const auto* list : {&params_, &views_}) {
      for (const auto& o : *list) {
        TORCH_CHECK(THPVariable_Check(o.ptr()), "BucketCheck takes tensors");
      }
    }
    hashes_ = hashes_of(params_);  // once here, not at every step
    offsets_ = offsets_in(ptrs, pdata_, pbytes_, flat_param.element_size());
    goffsets_ = offsets_in(gptrs, gdata_, gbytes_, flat_grad.element_size());
  }
  /// One pass over the bucket's parameters (each one's objects touched once, while in cache):
  /// -1 if a parameter is not intact (it moved, or its .grad is not its flat view, or the view
  /// moved); else, with `state` None 0, otherwise the momentum buffers as the optimizer's state
  /// holds them (state[p]["momentum_buffer"]): 0 if each is its flat view in `buf_views`, over
  /// the flat buffer's storage (`buf_storage`, its StorageImpl's address) at its parameter's
  /// offset (buf.data = ... or buf.set_ would have moved it), 1 if none
  /// has one (no entry, no key or None), 2 otherwise (then Python looks at each).
  int check(const pybind11::object& state, const pybind11::object& buf_views,
            int64_t buf_storage) const {
    const bool bufs = !state.is_none();
    if (bufs && !PyDict_Check(state.ptr())) return intact_all() ? 2 : -1;
    const bool views = PyList_Check(buf_views.ptr()) &&
                       PyList_GET_SIZE(buf_views.ptr()) == static_cast<Py_ssize_t>(params_.size());
    static PyObject* const key = PyUnicode_InternFromString("momentum_buffer");
    bool all_views = views, all_none = true;
    if (!storages_stay()) return -1;
    for (size_t i = 0; i < params_.size(); ++i) {
      prefetch(i);
      if (bufs && views) prefetch_buf(buf_views.ptr(), i);
      if (!intact(i)) return -1;
      if (!bufs || (!all_none && !all_views)) continue;  // the kind is known: 2
      PyObject* entry = dict_lookup(state.ptr(), params_[i].ptr(), hashes_[i]);
      if (entry == nullptr && PyErr_Occurred()) throw pybind11::error_already_set();
      PyObject* buf = nullptr;
      if (entry != nullptr) {
        if (!PyDict_Check(entry)) {
          all_views = all_none = false;
          continue;
        }
        buf = PyDict_GetItem(entry, key);  // borrowed, no exception; the str caches its hash
      }
      if (buf == Py_None) buf = nullptr;
      all_none = all_none && buf == nullptr;
      all_views = all_views && buf != nullptr &&
                  buf == PyList_GET_ITEM(buf_views.ptr(), static_cast<Py_ssize_t>(i)) &&
                  at_place(THPVariable_Unpack(buf), i, buf_storage);
    }
    return !bufs || all_views ? 0 : all_none ? 1 : 2;
  }

  /// Buffer view b is over flat_buf (`storage`, its StorageImpl) where parameter i is in its
  /// flat parameter: the same offset. Both read from the tensors' own fields, no further
  /// pointer (a cold buffer view costs one miss, prefetched).
  bool at_place(const at::Tensor& b, size_t i, int64_t storage) const {
    const c10::TensorImpl* t = b.unsafeGetTensorImpl();
    return t->has_storage() &&
           reinterpret_cast<int64_t>(t->unsafe_storage().unsafeGetStorageImpl()) == storage &&
           t->storage_offset() ==
               THPVariable_Unpack(params_[i].ptr()).unsafeGetTensorImpl()->storage_offset() &&
           shaped(t, i);
  }

  /// Whether some parameter is intact with its flat gradient view as .grad (a flat run could
  /// step it): a kept step that ran none of the bucket flat replays only while none is.
  bool any_intact() const {
    if (!storages_stay()) return false;
    for (size_t i = 0; i < params_.size(); ++i) {
      prefetch(i);
      if (intact(i)) return true;
    }
    return false;
  }

  /// The bucket's step as the optimizer's last step ran it (sgd_step_flat_ on its flat
  /// buffers and run segments, not a first step, hyper-parameters Python numbers), kept for
  /// replay().
  void arm(at::Tensor param, at::Tensor grad, std::optional<at::Tensor> buf,
           at::Tensor segments, double lr, double momentum, double dampening,
           double weight_decay, bool nesterov, bool maximize) {
    step_ = Step{std::move(param), std::move(grad), std::move(buf), std::move(segments),
                 lr, momentum, dampening, weight_decay, nesterov, maximize};
  }

  /// check(state, buf_views), and where it passes (0) the armed step (sgd_step_flat, which
  /// checks its arguments as the op does) and the parameters' version bumps, in this one call:
  /// the replay of a bucket that is a step's only work (optim._step_steady) skips the op's
  /// Python call, argument parsing and dispatch, which a cold cache makes cost as much as the
  /// kernel. Eager only: a traced or profiled step goes through the op. Returns check's result.
  int replay(const pybind11::object& state, const pybind11::object& buf_views,
             int64_t buf_storage) {
    TORCH_CHECK(step_.has_value(), "BucketCheck.replay: no step was armed");
    const int r = check(state, buf_views, buf_storage);
    if (r != 0) return r;
    const Step& s = *step_;
    sgd_step_flat(s.param, s.grad, s.buf, s.segments, s.lr, s.momentum, s.dampening,
                  s.weight_decay, s.nesterov, s.maximize, /*first_step=*/false,
                  s.param.device().type(), kNoTensors);
    // as the op's dispatch would (its schema marks all three written): the buffer views
    // share flat_buf's counter (autograd views of it)
    for (const at::Tensor* t : {&s.param, &s.grad}) torch::autograd::impl::bump_version(*t);
    if (s.buf.has_value() && s.buf->defined()) torch::autograd::impl::bump_version(*s.buf);
    bump(0, params_.size());
    return 0;
  }

  /// The version counters of params[i0:i1] up by one, as an in-place op's (optim._Bucket.bump:
  /// the kernel wrote them through the flat buffer), in C++ over the objects held here.
  void bump(size_t i0, size_t i1) const {
    TORCH_CHECK(i0 <= i1 && i1 <= params_.size(), "BucketCheck.bump: [", i0, ", ", i1,
                ") is not a range of its ", params_.size(), " parameters");
    for (size_t i = i0; i < i1; ++i) {
      prefetch(i, /*grads=*/false);
      torch::autograd::impl::bump_version(THPVariable_Unpack(params_[i].ptr()));
    }
  }

 private:
  /// Parameter i at its address, its .grad the flat view (one TensorImpl has one Python
  /// object: the same impl is `p.grad is view`), the view at its address. An address is the
  /// held storage and an offset in it (storages_stay() has checked that the storages' memory
  /// has not moved): read from the TensorImpls alone, not from their cold StorageImpls.
  bool intact(size_t i) const {
    const at::Tensor& p = THPVariable_Unpack(params_[i].ptr());
    const c10::TensorImpl* v = THPVariable_Unpack(views_[i].ptr()).unsafeGetTensorImpl();
    const at::Tensor& g = p.grad();
    return g.defined() && g.unsafeGetTensorImpl() == v &&
           in(p.unsafeGetTensorImpl(), pstore_, offsets_[i]) && in(v, gstore_, goffsets_[i]) &&
           shaped(p.unsafeGetTensorImpl(), i) && shaped(v, i);
  }
  /// t has parameter i's sizes and strides as laid out and the bucket's dtype, and is a plain
  /// tensor: no negative or conjugate view bit, not a ZeroTensor (t_(), .data = a view of
  /// another shape or dtype, or _neg_view() keep its storage and offset; the kernels read the
  /// memory as the layout placed it).
  bool shaped(const c10::TensorImpl* t, size_t i) const {
    const int64_t* m = meta_.data() + meta_at_[i];
    const int64_t dim = m[0];
    if (t->dim() != dim || t->dtype() != dtype_ || t->is_neg() || t->is_conj() ||
        t->_is_zerotensor()) {
      return false;
    }
    const auto sizes = t->sizes();
    const auto strides = t->strides();
    for (int64_t d = 0; d < dim; ++d) {
      if (sizes[d] != m[1 + d] || strides[d] != m[1 + dim + d]) return false;
    }
    return true;
  }
  /// t is over `store` at element offset `offset` (-1: never).
  static bool in(const c10::TensorImpl* t, const Weak& store, int64_t offset) {
    return t->has_storage() &&
           t->unsafe_storage().unsafeGetStorageImpl() == store._unsafe_get_target() &&
           t->storage_offset() == offset;
  }
  /// The storages alive, their memory where it was when this check was made (a storage
  /// resized or given other memory moves every tensor over it).
  bool storages_stay() const {
    const auto stays = [](const Weak& w, const void* data, size_t bytes) {
      return !w.expired() && w._unsafe_get_target()->data() == data &&
             w._unsafe_get_target()->nbytes() == bytes;
    };
    return stays(pstore_, pdata_, pbytes_) && stays(gstore_, gdata_, gbytes_);
  }
  /// Each address's element offset in a storage at `data` of `bytes` bytes (-1 where it is
  /// not an element there).
  static std::vector<int64_t> offsets_in(const std::vector<int64_t>& ptrs, const void* data,
                                         size_t bytes, int64_t itemsize) {
    std::vector<int64_t> out;
    out.reserve(ptrs.size());
    const auto base = reinterpret_cast<int64_t>(data);
    for (const int64_t ptr : ptrs) {
      const int64_t d = ptr - base;
      out.push_back(d >= 0 && d <= static_cast<int64_t>(bytes) && d % itemsize == 0
                        ? d / itemsize
                        : -1);
    }
    return out;
  }
  /// Starts loading, a few parameters ahead of i, the memory intact() and bump() read. Each
  /// parameter is a chain of pointers (Python object, TensorImpl, then its storage and
  /// autograd meta, then the gradient), cold in a training loop (the forward and backward ran
  /// since the last step): walked one after the other, every link is a miss. Prefetched in
  /// three stages, the misses of several parameters overlap. grads: the gradient views' too
  /// (intact() reads them; bump() reads only the parameters).
  void prefetch(size_t i, bool grads = true) const {
#if defined(__GNUC__)
    const size_t n = params_.size();
    const auto impl = [](const pybind11::object& o) {
      return THPVariable_Unpack(o.ptr()).unsafeGetTensorImpl();
    };
    const auto lines = [](const void* p) {  // a TensorImpl's first three cache lines
      for (int line = 0; line < 3; ++line) {
        __builtin_prefetch(static_cast<const char*>(p) + 64 * line);
      }
    };
    if (i + 16 < n) {
      __builtin_prefetch(params_[i + 16].ptr());
      if (grads) __builtin_prefetch(views_[i + 16].ptr());
    }
    if (i + 10 < n) {
      lines(impl(params_[i + 10]));
      if (grads) lines(impl(views_[i + 10]));  // the gradient's, when intact
    }
    if (grads && i + 4 < n) __builtin_prefetch(impl(params_[i + 4])->autograd_meta());
#else
    (void)i;
    (void)grads;
#endif
  }
  /// The buffer views' objects and tensors (at_place reads each one's fields), ahead of i
  /// as prefetch() loads the parameters'.
  void prefetch_buf(PyObject* buf_views, size_t i) const {
#if defined(__GNUC__)
    const size_t n = params_.size();
    if (i + 24 < n) __builtin_prefetch(PyList_GET_ITEM(buf_views, static_cast<Py_ssize_t>(i + 24)));
    const auto impl = [&](size_t k) {
      return THPVariable_Unpack(PyList_GET_ITEM(buf_views, static_cast<Py_ssize_t>(k)))
          .unsafeGetTensorImpl();
    };
    if (i + 12 < n) {
      const c10::TensorImpl* t = impl(i + 12);
      for (int line = 0; line < 3; ++line) {
        __builtin_prefetch(reinterpret_cast<const char*>(t) + 64 * line);
      }
    }
#else
    (void)buf_views;
    (void)i;
#endif
  }
  bool intact_all() const {
    for (size_t i = 0; i < params_.size(); ++i) {
      prefetch(i);
      if (!intact(i)) return false;
    }
    return true;
  }
  std::vector<pybind11::object> params_, views_;
  caffe2::TypeMeta dtype_;
  /// meta_[meta_at_[i]]: parameter i's rank r, then its r sizes and r strides
  std::vector<int64_t> meta_, meta_at_;
  Weak pstore_, gstore_;
  const void *pdata_, *gdata_;
  size_t pbytes_, gbytes_;
  std::vector<int64_t> offsets_, goffsets_;  ///< the parameters' and views' storage offsets
  std::vector<Py_hash_t> hashes_;
  struct Step {
    at::Tensor param, grad;
    std::optional<at::Tensor> buf;
    at::Tensor segments;
    double lr, momentum, dampening, weight_decay;
    bool nesterov, maximize;
  };
  std::optional<Step> step_;  ///< arm()'s
};

/// The per-tensor path's per-step check of one kept list call (optim._ListCall, replayed by
/// optim._step_steady) in one pass: each parameter where the kept step left it (address, sizes,
/// strides, dtype, device and, where `watch`, its version counter as commit() recorded it); with
/// `stepped`, a dense .grad of its dtype, device, sizes and strides, and its state entries
/// state[p][key] for `keys` the objects in `held` (None: absent or None), each tensor among them
/// unchanged in dtype, device, sizes and strides; without, no .grad. Parameters are held as
/// Python objects (as BucketCheck, for torch.utils.swap_tensors); `held` keeps the state's
/// objects alive while the check lives, so identity cannot be fooled by a reused address.
class ListCheck {
 public:
  ListCheck(std::vector<pybind11::object> params, bool stepped, std::vector<std::string> keys,
            std::vector<std::vector<pybind11::object>> held, std::vector<bool> watch)
      : params_(std::move(params)), stepped_(stepped), held_(std::move(held)),
        watch_(std::move(watch)) {
    TORCH_CHECK(held_.size() == params_.size() && watch_.size() == params_.size(),
                "ListCheck: held objects and a watch flag per parameter");
    for (const auto& k : keys) {
      keys_.push_back(pybind11::reinterpret_steal<pybind11::object>(
          PyUnicode_InternFromString(k.c_str())));
    }
    for (size_t i = 0; i < params_.size(); ++i) {
      TORCH_CHECK(THPVariable_Check(params_[i].ptr()), "ListCheck takes tensors");
      TORCH_CHECK(held_[i].size() == keys_.size(), "ListCheck: one held object per key");
      params_meta_.push_back(Meta::of(THPVariable_Unpack(params_[i].ptr())));
      for (const auto& o : held_[i]) {
        held_meta_.push_back(THPVariable_Check(o.ptr()) ? Meta::of(THPVariable_Unpack(o.ptr()))
                                                         : Meta{});
      }
    }
    hashes_ = hashes_of(params_);
    versions_.assign(params_.size(), 0);
    record_versions();
  }

  /// If everything holds, the gradients (a new list, in order; without `stepped`: True); else
  /// None.
  pybind11::object check(const pybind11::object& state) const {
    pybind11::list grads(stepped_ ? params_.size() : 0);
    const bool ok = holds(state, [&](size_t i, const at::Tensor& g) {
      PyObject* wrapped = THPVariable_Wrap(g);  // its Python object (a new reference)
      if (wrapped == nullptr) throw pybind11::error_already_set();
      PyList_SET_ITEM(grads.ptr(), static_cast<Py_ssize_t>(i), wrapped);
    });
    if (!ok) return pybind11::none();
    return stepped_ ? pybind11::object(std::move(grads)) : pybind11::object(pybind11::bool_(true));
  }

  /// The plain list call as the optimizer's last step ran it (sgd_step_list_ on these
  /// parameters, not a first step, hyper-parameters Python numbers), kept for replay(). Its
  /// momentum buffers are the objects held for the one key (state["momentum_buffer"]); with no
  /// key, momentum is 0 and there are none.
  void arm(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
           bool maximize) {
    TORCH_CHECK(stepped_ && keys_.size() <= 1,
                "ListCheck.arm: a plain list call steps its parameters with at most one state "
                "key, the momentum buffer");
    for (const auto& held : held_) {
      for (const auto& o : held) {
        TORCH_CHECK(THPVariable_Check(o.ptr()), "ListCheck.arm: a momentum buffer is not a tensor");
      }
    }
    step_ = Step{lr, momentum, dampening, weight_decay, nesterov, maximize};
  }

  /// check(state), and where it passes the armed step on the gradients it found
  /// (sgd_step_list, which checks its arguments as the op does) and the version bumps of the
  /// parameters and buffers, as the op's, in this one call: the replay of a list call that is
  /// a step's only work (optim._step_steady) skips the op's Python call, its boxed dispatch
  /// and the Python list of gradients. The tensors are taken from the Python objects now (as
  /// check() reads them: torch.utils.swap_tensors changes what an object holds). Returns
  /// whether it ran.
  bool replay(const pybind11::object& state) {
    TORCH_CHECK(step_.has_value(), "ListCheck.replay: no step was armed");
    const size_t n = params_.size();
    const bool bufs = !keys_.empty();
    ps_.resize(n);  // (kept between steps: no allocation per step)
    gs_.resize(n);
    bs_.resize(bufs ? n : 0);
    const bool ok = holds(state, [&](size_t i, const at::Tensor& g) {
      ps_[i] = THPVariable_Unpack(params_[i].ptr());
      gs_[i] = g;
      if (bufs) bs_[i] = THPVariable_Unpack(held_[i][0].ptr());
    });
    if (ok && n > 0) {
      const Step& s = *step_;
      sgd_step_list(ps_, gs_, bs_, s.lr, s.momentum, s.dampening, s.weight_decay, s.nesterov,
                    s.maximize, /*first_step=*/false, ps_[0].device().type(), /*single=*/false);
      for (const auto& t : ps_) torch::autograd::impl::bump_version(t);
      for (const auto& t : bs_) torch::autograd::impl::bump_version(t);
    }
    ps_.clear();  // (nothing kept alive past the step)
    gs_.clear();
    bs_.clear();
    return ok;
  }

  /// The memory of every tensor of the kept step that a gradient must not share (its
  /// parameters, buffers and the flat calls' spans; on this call's device), as (address,
  /// bytes) pairs.
  void forbid(const std::vector<std::pair<int64_t, int64_t>>& spans) {
    forbidden_.clear();
    for (const auto& [ptr, bytes] : spans) {
      if (bytes <= 0) continue;
      const auto lo = static_cast<uintptr_t>(ptr);
      forbidden_.push_back({lo, lo + static_cast<uintptr_t>(bytes)});
    }
    std::sort(forbidden_.begin(), forbidden_.end());
  }

  /// After the replayed op: the watched version counters as it left them; and, given a dict
  /// (optim's _master_seen), seen[id(p)] = (data_ptr, version) for every watched parameter.
  void commit(const pybind11::object& seen) {
    record_versions();
    if (seen.is_none()) return;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (!watch_[i]) continue;
      const at::Tensor& p = THPVariable_Unpack(params_[i].ptr());
      const auto id = pybind11::reinterpret_steal<pybind11::object>(
          PyLong_FromVoidPtr(params_[i].ptr()));  // id(p)
      if (!id) throw pybind11::error_already_set();
      seen[id] = pybind11::make_tuple(reinterpret_cast<int64_t>(p.data_ptr()),
                                      static_cast<int64_t>(p._version()));
    }
  }

 private:
  /// What a tensor must keep: address and storage (not for a gradient, a new tensor at every
  /// step), dtype, device, sizes, strides, strided layout. The storage tells memory freed and
  /// given again at the same address (p.data moved twice between steps, as model.half()
  /// .bfloat16() on a caching allocator does) from memory kept: `pin`, a weak reference,
  /// keeps the StorageImpl object allocated, so no other storage can take its address.
  struct Meta {
    bool tensor = false;
    int64_t ptr = 0;
    const c10::StorageImpl* storage = nullptr;
    std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> pin;
    at::ScalarType dtype = at::kFloat;
    at::Device device = at::kCPU;
    std::vector<int64_t> sizes, strides;
    static Meta of(const at::Tensor& t) {
      Meta m;
      m.tensor = t.layout() == at::kStrided;
      if (!m.tensor) return m;  // a sparse one never passes same()
      m.ptr = reinterpret_cast<int64_t>(t.data_ptr());
      if (t.has_storage()) {
        m.storage = storage_of(t);
        m.pin.emplace(t.storage().getWeakStorageImpl());
      }
      m.dtype = t.scalar_type();
      m.device = t.device();
      m.sizes = t.sizes().vec();
      m.strides = t.strides().vec();
      return m;
    }
    bool same(const at::Tensor& t, bool address = true) const {
      return tensor && t.layout() == at::kStrided && plain(t) && t.scalar_type() == dtype &&
             t.device() == device && t.sizes() == c10::IntArrayRef(sizes) &&
             t.strides() == c10::IntArrayRef(strides) &&
             (!address ||
              (reinterpret_cast<int64_t>(t.data_ptr()) == ptr && storage_of(t) == storage));
    }
    /// (no reference count touched: this runs per parameter at every replayed step)
    static const c10::StorageImpl* storage_of(const at::Tensor& t) {
      const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
      return impl->has_storage() ? impl->unsafe_storage().unsafeGetStorageImpl() : nullptr;
    }
  };

  /// Whether everything holds; `grad(i, g)` is called with each stepped parameter's gradient.
  template <class F>
  bool holds(const pybind11::object& state, F&& grad) const {
    spans_.clear();
    if (stepped_ && !keys_.empty() && !PyDict_Check(state.ptr())) return false;
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& p = THPVariable_Unpack(params_[i].ptr());
      if (!params_meta_[i].same(p)) return false;
      if (watch_[i] && static_cast<int64_t>(p._version()) != versions_[i]) return false;
      const at::Tensor& g = p.grad();
      if (!stepped_) {
        if (g.defined()) return false;
        continue;
      }
      if (!g.defined() || !params_meta_[i].same(g, /*address=*/false)) return false;
      if (!keys_.empty() && !same_state(state.ptr(), i)) return false;
      if (g.numel() > 0) {
        const auto lo = reinterpret_cast<uintptr_t>(g.data_ptr());
        spans_.push_back({lo, lo + static_cast<uintptr_t>(g.nbytes())});
      }
      grad(i, g);
    }
    return !stepped_ || grads_apart();
  }

  /// The gradients just read (spans_, cleared here) share no memory with one another nor with
  /// any tensor of the kept step (forbid()'s): the kernel reads them all at once, while torch's
  /// for-loop would read a gradient that is another parameter, a buffer or another's gradient
  /// after the steps before it. Each is dense (laid out like its parameter), so its memory
  /// is [data_ptr, + nbytes). Sorted, an overlap shows between neighbours, and against the
  /// sorted forbidden spans in one merge.
  bool grads_apart() const {
    std::sort(spans_.begin(), spans_.end());
    bool apart = true;
    for (size_t k = 1; k < spans_.size() && apart; ++k) {
      apart = spans_[k].first >= spans_[k - 1].second;
    }
    for (size_t a = 0, b = 0; apart && a < spans_.size() && b < forbidden_.size();) {
      if (spans_[a].second <= forbidden_[b].first) {
        ++a;
      } else if (forbidden_[b].second <= spans_[a].first) {
        ++b;
      } else {
        apart = false;
      }
    }
    spans_.clear();
    return apart;
  }

  bool same_state(PyObject* state, size_t i) const {
    PyObject* entry = dict_lookup(state, params_[i].ptr(), hashes_[i]);
    if (entry == nullptr) {
      if (PyErr_Occurred()) throw pybind11::error_already_set();
      return false;
    }
    if (!PyDict_Check(entry)) return false;
    for (size_t k = 0; k < keys_.size(); ++k) {
      PyObject* v = PyDict_GetItem(entry, keys_[k].ptr());  // borrowed, no exception
      PyObject* want = held_[i][k].ptr();
      if ((v == nullptr ? Py_None : v) != want) return false;
      const Meta& m = held_meta_[i * keys_.size() + k];
      if (m.tensor && !m.same(THPVariable_Unpack(want))) return false;
    }
    return true;
  }

  void record_versions() {
    for (size_t i = 0; i < params_.size(); ++i) {
      if (watch_[i]) {
        versions_[i] = static_cast<int64_t>(THPVariable_Unpack(params_[i].ptr())._version());
      }
    }
  }

  std::vector<pybind11::object> params_;
  bool stepped_;
  std::vector<pybind11::object> keys_;
  std::vector<std::vector<pybind11::object>> held_;
  std::vector<bool> watch_;
  std::vector<Meta> params_meta_, held_meta_;
  std::vector<Py_hash_t> hashes_;
  std::vector<int64_t> versions_;
  struct Step {
    double lr, momentum, dampening, weight_decay;
    bool nesterov, maximize;
  };
  std::optional<Step> step_;          ///< arm()'s
  std::vector<at::Tensor> ps_, gs_, bs_;  ///< replay()'s lists, empty between steps
  using Span = std::pair<uintptr_t, uintptr_t>;
  std::vector<Span> forbidden_;        ///< forbid()'s, sorted
  mutable std::vector<Span> spans_;    ///< holds()'s gradient spans, empty between checks
};

/// optim.clip_grad_norm_'s record of the gradients it measured, checked by the step that applies
/// the clip: each parameter's .grad then must still be the tensor measured (or None, if it was),
/// not written since (its version counter), and the optimizer must hold the same parameters in
/// the same order. It holds weak references to the gradients (whose memory then cannot be reused
/// by another tensor while it lives: an address compares identity) and keeps none alive.
class GradWatch {
 public:
  explicit GradWatch(std::vector<pybind11::object> params) : params_(std::move(params)) {
    grads_.reserve(params_.size());
    versions_.reserve(params_.size());
    for (const auto& o : params_) {
      TORCH_CHECK(THPVariable_Check(o.ptr()), "GradWatch takes tensors");
      const at::Tensor& g = THPVariable_Unpack(o.ptr()).grad();
      if (g.defined()) {
        grads_.emplace_back(std::in_place, g.getIntrusivePtr());
      } else {
        grads_.emplace_back(std::nullopt);
      }
      versions_.push_back(g.defined() ? static_cast<int64_t>(g._version()) : -1);
      places_.push_back(place(g));
    }
  }
  /// -1 if every parameter of `groups` (lists of parameters, in order) is the one measured there
  /// and holds its measured gradient unwritten (or none, as then); else the first position that
  /// does not (params().size() if the groups hold more parameters).
  int64_t changed(const std::vector<std::vector<pybind11::object>>& groups) const {
    size_t i = 0;
    for (const auto& group : groups) {
      for (const auto& o : group) {
        if (i == params_.size() || o.ptr() != params_[i].ptr()) return static_cast<int64_t>(i);
        const at::Tensor& g = THPVariable_Unpack(o.ptr()).grad();
        const auto& w = grads_[i];
        const bool same = w.has_value()
                              ? g.defined() && w->_unsafe_get_target() == g.unsafeGetTensorImpl() &&
                                    static_cast<int64_t>(g._version()) == versions_[i] &&
                                    place(g) == places_[i]
                              : !g.defined();
        if (!same) return static_cast<int64_t>(i);
        ++i;
      }
    }
    return i == params_.size() ? -1 : static_cast<int64_t>(i);
  }
  const std::vector<pybind11::object>& params() const { return params_; }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  /// Where a gradient's values are: its storage, offset and dtype. `g.data = ...` (what
  /// Module._apply does to .grad in model.to()) keeps the tensor and its version counter but
  /// changes these.
  using Place = std::tuple<const void*, int64_t, at::ScalarType>;
  static Place place(const at::Tensor& g) {
    if (!g.defined() || !g.unsafeGetTensorImpl()->has_storage()) return {nullptr, 0, at::kFloat};
    return {g.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(), g.storage_offset(),
            g.scalar_type()};
  }
  std::vector<pybind11::object> params_;
  std::vector<std::optional<Weak>> grads_;
  std::vector<int64_t> versions_;
  std::vector<Place> places_;
};

/// mc_sr_key(seed, steps[k], streams[k]) for every k: the keys of a stochastic-rounding list
/// call, made at every step (optim._replay_list).
std::vector<int64_t> sr_keys(int64_t seed, const std::vector<int64_t>& steps,
                             const std::vector<int64_t>& streams) {
  TORCH_CHECK(steps.size() == streams.size(), "sr_keys: one stream per step, got ",
              steps.size(), " steps and ", streams.size(), " streams");
  std::vector<int64_t> keys(steps.size());
  for (size_t k = 0; k < steps.size(); ++k) {
    keys[k] = mc_sr_key(static_cast<uint64_t>(seed), static_cast<uint64_t>(steps[k]),
                        static_cast<uint64_t>(streams[k]));
  }
  return keys;
}

/// Whether two sequences (lists or tuples) hold the same objects in the same order, compared by
/// identity: Tensor.__eq__ is elementwise, so Python's == on lists of tensors is not this.
bool same_objects(const pybind11::handle& a, const pybind11::handle& b) {
  const pybind11::object fa = pybind11::reinterpret_steal<pybind11::object>(
      PySequence_Fast(a.ptr(), "same_objects takes lists or tuples"));
  if (!fa) throw pybind11::error_already_set();
  const pybind11::object fb = pybind11::reinterpret_steal<pybind11::object>(
      PySequence_Fast(b.ptr(), "same_objects takes lists or tuples"));
  if (!fb) throw pybind11::error_already_set();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fa.ptr());
  if (n != PySequence_Fast_GET_SIZE(fb.ptr())) return false;
  PyObject** ia = PySequence_Fast_ITEMS(fa.ptr());
  PyObject** ib = PySequence_Fast_ITEMS(fb.ptr());
  return std::equal(ia, ia + n, ib);
}

std::string isa_name(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? "avx512" : isa == CpuIsa::kAvx2 ? "avx2" : "default";
}

}  // namespace
}  // namespace momentum_cuda

// Schemas: (a!)/(b!)/(c!) mark what each op may write. Gradients are written only when
// grad_scale or clip_coef is given (unscaled and clipped in place, as GradScaler.unscale_ and
// clip_grad_norm_ leave them); segments are read. A *_tensor hyper-parameter is read in place
// of its float (StepTensors).
TORCH_LIBRARY(momentum_cuda, m) {
  m.def(
      "sgd_step_flat_(Tensor(a!) param, Tensor(b!) grad, Tensor(c!)? momentum_buffer, "
      "Tensor segments, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool first_step, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? lr_tensor=None, Tensor? clip_coef=None, "
      "Tensor? momentum_tensor=None, Tensor? dampening_tensor=None, "
      "Tensor? weight_decay_tensor=None, Tensor? first_step_tensor=None) -> ()");
  m.def(
      "sgd_step_list_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool first_step, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? lr_tensor=None, Tensor? clip_coef=None, Tensor? momentum_tensor=None, "
      "Tensor? dampening_tensor=None, Tensor? weight_decay_tensor=None, "
      "Tensor? first_step_tensor=None) -> ()");
  m.def(
      "sgd_step_master_list_(Tensor(a!)[] params, Tensor[] grads, Tensor(c!)[] momentum_buffers, "
      "Tensor(d!)[] remainders, Tensor(e!)[] ties, float lr, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize, bool first_step, "
      "Tensor? found_inf=None, Tensor? lr_tensor=None, Tensor? momentum_tensor=None, "
      "Tensor? dampening_tensor=None, Tensor? weight_decay_tensor=None) -> ()");
  m.def(
      "sgd_step_sr_list_(Tensor(a!)[] params, Tensor[] grads, Tensor(c!)[] momentum_buffers, "
      "int[] keys, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool first_step, int[]? offsets=None, "
      "Tensor? lr_tensor=None, Tensor? momentum_tensor=None, "
      "Tensor? dampening_tensor=None, Tensor? weight_decay_tensor=None) -> ()");
  m.def(
      "sgd_step_qmom_list_(Tensor(a!)[] params, Tensor[] grads, Tensor(c!)[] momentum_buffers, "
      "Tensor(d!)[] scales, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool first_step, Tensor? found_inf=None, "
      "Tensor? lr_tensor=None, Tensor? momentum_tensor=None, "
      "Tensor? dampening_tensor=None, Tensor? weight_decay_tensor=None) -> ()");
  m.def(
      "sgd_step_fp16_master_list_(Tensor(a!)[] params, Tensor[] grads, "
      "Tensor(c!)[] momentum_buffers, Tensor(d!)[] masters, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step, "
      "Tensor? found_inf=None, Tensor? lr_tensor=None, Tensor? momentum_tensor=None, "
      "Tensor? dampening_tensor=None, Tensor? weight_decay_tensor=None) -> ()");
}

TORCH_LIBRARY_IMPL(momentum_cuda, CPU, m) {
  namespace mc = momentum_cuda;
  m.impl("sgd_step_flat_", &mc::step_flat_<c10::DeviceType::CPU>);
  m.impl("sgd_step_list_", &mc::step_list_<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(momentum_cuda, ADInplaceOrView, m) {
  namespace mc = momentum_cuda;
  m.impl("sgd_step_flat_", torch::CppFunction::makeFromBoxedFunction<&mc::bump_written<0>>());
  m.impl("sgd_step_list_", torch::CppFunction::makeFromBoxedFunction<&mc::bump_written<1>>());
  m.impl("sgd_step_master_list_",
         torch::CppFunction::makeFromBoxedFunction<&mc::bump_written<2>>());
  m.impl("sgd_step_sr_list_", torch::CppFunction::makeFromBoxedFunction<&mc::bump_written<3>>());
  m.impl("sgd_step_qmom_list_",
         torch::CppFunction::makeFromBoxedFunction<&mc::bump_written<4>>());
  m.impl("sgd_step_fp16_master_list_",
         torch::CppFunction::makeFromBoxedFunction<&mc::bump_written<5>>());
}

TORCH_LIBRARY_IMPL(momentum_cuda, CompositeExplicitAutograd, m) {
  m.impl("sgd_step_flat_", &momentum_cuda::step_flat_other_);
  m.impl("sgd_step_list_", &momentum_cuda::step_list_other_);
  // every device: the device check names the tensor where there is no kernel
  m.impl("sgd_step_master_list_", &momentum_cuda::step_master_list_);
  m.impl("sgd_step_sr_list_", &momentum_cuda::step_sr_list_);
  m.impl("sgd_step_qmom_list_", &momentum_cuda::step_qmom_list_);
  m.impl("sgd_step_fp16_master_list_", &momentum_cuda::step_fp16_master_list_);
}

#ifdef MOMENTUM_CUDA_WITH_CUDA
TORCH_LIBRARY_IMPL(momentum_cuda, CUDA, m) {
  namespace mc = momentum_cuda;
  m.impl("sgd_step_flat_", &mc::step_flat_<c10::DeviceType::CUDA>);
  m.impl("sgd_step_list_", &mc::step_list_<c10::DeviceType::CUDA>);
}
#endif

PYBIND11_MODULE(_C, m) {
  namespace mc = momentum_cuda;
  namespace py = pybind11;
  m.doc() = "momentum_cuda's extension: importing it registers the ops torch.ops.momentum_cuda."
            "sgd_step_flat_ and sgd_step_list_ (csrc/momentum_ops.cpp); the module itself holds "
            "the CPU kernel's instruction-set switch.";
  m.def("cpu_isa", [] { return mc::isa_name(mc::cpu_isa()); },
        "The instruction set the CPU kernel uses now: 'avx512' (bf16/fp16 only; fp32/fp64 run "
        "the avx2 code), 'avx2' or 'default'.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        TORCH_CHECK(name == "avx512" || name == "avx2" || name == "default",
                    "isa must be 'avx512', 'avx2' or 'default', got '", name, "'");
        const mc::CpuIsa isa = name == "avx512" ? mc::CpuIsa::kAvx512
                               : name == "avx2" ? mc::CpuIsa::kAvx2
                                                : mc::CpuIsa::kDefault;
        TORCH_CHECK(mc::cpu_isa_available(isa), "isa='", name, "' is not supported by this CPU");
        const std::string old = mc::isa_name(mc::cpu_isa());
        mc::set_cpu_isa(isa);
        return old;
      },
      "Forces the CPU kernel's instruction set (for tests); returns the previous one.",
      py::arg("isa"));
  py::class_<mc::BucketCheck>(m, "BucketCheck",
                              "The flat path's per-step check of one bucket (optim._Bucket).")
      .def(py::init<std::vector<py::object>, std::vector<py::object>,
                    const std::vector<int64_t>&, const std::vector<int64_t>&,
                    const at::Tensor&, const at::Tensor&,
                    const std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>>&>(),
           py::arg("params"), py::arg("grad_views"), py::arg("ptrs"), py::arg("gptrs"),
           py::arg("flat_param"), py::arg("flat_grad"), py::arg("meta"))
      .def("check", &mc::BucketCheck::check, py::arg("state"), py::arg("buf_views"),
           py::arg("buf_storage"),
           "-1: a parameter moved or its .grad is not its flat view (at its address); else "
           "(state None) 0, or 0: every state[p]['momentum_buffer'] is its flat view; 1: none "
           "has a buffer; 2: otherwise.")
      .def("any_intact", &mc::BucketCheck::any_intact,
           "Some parameter is at its address with its flat gradient view as .grad.")
      .def("bump", &mc::BucketCheck::bump, py::arg("i0"), py::arg("i1"),
           "The version counters of params[i0:i1] up by one.")
      .def("arm", &mc::BucketCheck::arm, py::arg("param"), py::arg("grad"), py::arg("buf"),
           py::arg("segments"), py::arg("lr"), py::arg("momentum"), py::arg("dampening"),
           py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"),
           "Keeps the bucket's step (sgd_step_flat_'s arguments, not a first step) for replay.")
      .def("replay", &mc::BucketCheck::replay, py::arg("state"), py::arg("buf_views"),
           py::arg("buf_storage"),
           "check(); where it passes (0), the armed step and the version bumps. Returns "
           "check's result.");
  py::class_<mc::ListCheck>(m, "ListCheck",
                            "The per-tensor path's per-step check of one kept list call.")
      .def(py::init<std::vector<py::object>, bool, std::vector<std::string>,
                    std::vector<std::vector<py::object>>, std::vector<bool>>(),
           py::arg("params"), py::arg("stepped"), py::arg("keys"), py::arg("held"),
           py::arg("watch"))
      .def("check", &mc::ListCheck::check, py::arg("state"),
           "None if something the kept call depends on changed; else its gradients (stepped) "
           "or True.")
      .def("arm", &mc::ListCheck::arm, py::arg("lr"), py::arg("momentum"),
           py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
           py::arg("maximize"),
           "Keeps the plain list call (sgd_step_list_'s hyper-parameters, not a first step; "
           "the buffers are the held objects) for replay.")
      .def("replay", &mc::ListCheck::replay, py::arg("state"),
           "check(); where it passes, the armed step on the gradients found and the version "
           "bumps. Returns whether it ran.")
      .def("forbid", &mc::ListCheck::forbid, py::arg("spans"),
           "The (address, bytes) spans of the kept step's tensors no gradient may share.")
      .def("commit", &mc::ListCheck::commit, py::arg("seen"),
           "Records the watched version counters (and seen[id(p)] = (data_ptr, version)).");
  py::class_<mc::GradWatch>(m, "GradWatch",
                            "optim.clip_grad_norm_'s record of the gradients it measured.")
      .def(py::init<std::vector<py::object>>(), py::arg("params"))
      .def("changed", &mc::GradWatch::changed, py::arg("groups"),
           "-1 if the groups hold the measured parameters, each with its measured gradient "
           "unwritten (or none); else the first position that differs.")
      .def_property_readonly("params", &mc::GradWatch::params);
  m.def(
      "host_value",
      [](const at::Tensor& t) {
        TORCH_CHECK(t.device().is_cpu() && t.numel() == 1,
                    "host_value takes a 1-element CPU tensor, got ", mc::describe(t));
        return t.item<double>();
      },
      py::arg("t"),
      "The value of a 1-element CPU tensor, as a double (read in C++: optim's checks of a "
      "hyper-parameter tensor, which Python's item() would count as a host read).");
  m.def("apart", &mc::apart, py::arg("lists"),
        "Whether no two strided tensors among the lists share memory.");
  m.def("same_objects", &mc::same_objects, py::arg("a"), py::arg("b"),
        "Whether two lists/tuples hold the same objects in order (identity, not ==).");
  m.def("sr_keys", &mc::sr_keys, py::arg("seed"), py::arg("steps"), py::arg("streams"),
        "reference.sr_key(seed, step, stream) for each (step, stream) pair.");
  m.def("kernel_ready", &mc::kernel_ready,
        "For the optimizer's per-tensor planning: whether the kernels take each (param, grad, "
        "buffer or None) as it is (else optim._check_loose decides).",
        py::arg("params"), py::arg("grads"), py::arg("bufs"));
#ifdef MOMENTUM_CUDA_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
