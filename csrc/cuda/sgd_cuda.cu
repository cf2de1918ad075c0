// sgd_cuda.cu — launchers of the kernels in sgd_kernel.cuh (grid sizes, argument packing).
//
// Inputs : spans validated by csrc/momentum_ops.cpp (device, dtype, sizes, overlap), the
//          current stream and device already set by the caller.
// Grid   : the flat kernel runs kThreads a block, as many blocks as the work needs up to what
//          fits on the GPU at once (flat_grid: the occupancy API's blocks per SM for this kernel
//          times the SMs, queried once per device and dtype), grid-stride beyond that; the
//          multi-tensor kernels (plain, int8 momentum, and the element-wise modes of
//          elementwise_kernel.cuh: master, stochastic rounding, bf16 momentum, fp16 master) one
//          block per 65536-element chunk.
#include "sgd_cuda.h"

#include <map>
#include <mutex>
#include <vector>

#include "fp16_master_kernel.cuh"
#include "master_kernel.cuh"
#include "qmom_kernel.cuh"
#include "sr_kernel.cuh"
#include "sgd_kernel.cuh"

namespace momentum_cuda {
namespace {

using cuda::kThreads;

#if CUDART_VERSION >= 12010
using ListLimits = cuda::ListLimits32K;  // 32 KB of kernel arguments: CUDA >= 12.1 on sm_70+
#else
using ListLimits = cuda::ListLimits4K;  // older toolkits: the classic 4 KB
#endif

template <class T>
using Opmath = typename cuda::Storage<T>::opmath;

template <class T>
cuda::CudaScalars<T> scalars(const StepHyper& h) {
  // On CUDA torch keeps every alpha in opmath (no narrowing to bf16/fp16, unlike its CPU path).
  return make_scalars<Opmath<T>>(h.lr, h.momentum, h.dampening, h.weight_decay,
                                 [](double v) { return static_cast<Opmath<T>>(v); });
}

/// What flat_grid needs about the current device for sgd_flat_kernel<T>.
struct FlatOccupancy {
  int blocks_per_sm;
  int sms;
};

/// The current device's FlatOccupancy for T, queried once per device (the step calls this every
/// time). A failed query is returned, not cached, and no grid is guessed; the runtime's last
/// error is cleared so that the next launch's cudaGetLastError() does not report it again.
template <class T>
cudaError_t flat_occupancy(FlatOccupancy* out) {
  const auto failed = [](cudaError_t e) {
    (void)cudaGetLastError();
    return e;
  };
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return failed(err);
  static std::mutex mu;
  static std::map<int, FlatOccupancy> cache;  // device -> occupancy, for this T
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(dev);
  if (it != cache.end()) {
    *out = it->second;
    return cudaSuccess;
  }
  FlatOccupancy o{0, 0};
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&o.blocks_per_sm,
                                                      cuda::sgd_flat_kernel<T>, kThreads, 0);
  if (err != cudaSuccess) return failed(err);
  err = cudaDeviceGetAttribute(&o.sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return failed(err);
  // 0 blocks per SM: one block of kThreads does not fit (registers), and a launch would fail
  // with this error anyway.
  if (o.blocks_per_sm < 1 || o.sms < 1) return cudaErrorLaunchOutOfResources;
  cache.emplace(dev, o);
  *out = o;
  return cudaSuccess;
}

}  // namespace

template <class T>
cudaError_t sgd_step_cuda_flat(const Span& span, const StepHyper& h, cudaStream_t stream) {
  if (span.numel == 0) return cudaSuccess;
  const cuda::FlatArgs<T> a{static_cast<T*>(span.param), static_cast<T*>(span.buf),
                            static_cast<T*>(span.grad), span.numel, scalars<T>(h), h.flags, h.amp,
                            h.dev};
  FlatOccupancy occ;
  const cudaError_t err = flat_occupancy<T>(&occ);
  if (err != cudaSuccess) return err;
  const auto blocks =
      static_cast<unsigned>(cuda::flat_grid<T>(span.numel, occ.blocks_per_sm, occ.sms));
  cuda::sgd_flat_kernel<T><<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <class T>
cudaError_t sgd_step_cuda_list(const Span* spans, int64_t n_spans, const StepHyper& h,
                               cudaStream_t stream) {
  std::vector<T*> params(n_spans), bufs(n_spans), grads(n_spans);
  std::vector<int64_t> numels(n_spans);
  for (int64_t k = 0; k < n_spans; ++k) {
    params[k] = static_cast<T*>(spans[k].param);
    bufs[k] = static_cast<T*>(spans[k].buf);
    grads[k] = static_cast<T*>(spans[k].grad);
    numels[k] = spans[k].numel;
  }
  cudaError_t err = cudaSuccess;
  using L = ListLimits;
  cuda::plan_list<T, L>(params.data(), (h.flags & kMomentum) ? bufs.data() : nullptr,
                        grads.data(), numels.data(), n_spans, scalars<T>(h), h.flags, h.amp,
                        h.dev, [&](const cuda::ListArgs<T, L::kTensors, L::kBlocks>& a, int blocks) {
                          if (err != cudaSuccess) return;
                          cuda::sgd_list_kernel<T, L::kTensors, L::kBlocks>
                              <<<blocks, kThreads, 0, stream>>>(a);
                          err = cudaGetLastError();
                        });
  return err;
}

/// Runs plan(spans, n_spans, scalars, flags, found_inf, dev, launch) with a launch of `kernel` per
/// batch; the first launch error is returned (and no later batch launched).
template <template <int, int> class Args, class Span_, class Plan, class Kernel>
cudaError_t launch_bf16(const Span_* spans, int64_t n_spans, const StepHyper& h,
                        cudaStream_t stream, Plan&& plan, Kernel kernel) {
  using L = ListLimits;
  cudaError_t err = cudaSuccess;
  plan(spans, n_spans, scalars<float>(h), h.flags, h.amp.found_inf, h.dev,
       [&](const Args<L::kTensors, L::kBlocks>& a, int blocks) {
         if (err != cudaSuccess) return;
         kernel<<<blocks, kThreads, 0, stream>>>(a);
         err = cudaGetLastError();
       });
  return err;
}

/// launch_bf16 for an element-wise mode of elementwise_kernel.cuh.
template <class Mode>
cudaError_t launch_elementwise(const typename Mode::Span* spans, int64_t n_spans,
                               const StepHyper& h, cudaStream_t stream) {
  using L = ListLimits;
  return launch_bf16<Mode::template Args>(
      spans, n_spans, h, stream, [](auto&&... x) { cuda::plan_elementwise<Mode, L>(x...); },
      cuda::sgd_elementwise_kernel<Mode, L::kTensors, L::kBlocks>);
}

cudaError_t sgd_step_master_cuda(const MasterSpan* spans, int64_t n_spans, const StepHyper& h,
                                 cudaStream_t stream) {
  return launch_elementwise<cuda::MasterMode>(spans, n_spans, h, stream);
}

cudaError_t sgd_step_sr_cuda(const SrSpan* spans, int64_t n_spans, const StepHyper& h,
                             cudaStream_t stream) {
  return launch_elementwise<cuda::SrMode>(spans, n_spans, h, stream);
}

cudaError_t sgd_step_bf16mom_cuda(const Bf16MomSpan* spans, int64_t n_spans,
                                  const StepHyper& h, cudaStream_t stream) {
  return launch_elementwise<cuda::Bf16MomMode>(spans, n_spans, h, stream);
}

cudaError_t sgd_step_q8_cuda(const Q8Span* spans, int64_t n_spans, const StepHyper& h,
                             cudaStream_t stream) {
  using L = ListLimits;
  return launch_bf16<cuda::Q8ListArgs>(
      spans, n_spans, h, stream, [](auto&&... x) { cuda::plan_q8_list<L>(x...); },
      cuda::sgd_q8_kernel<L::kTensors, L::kBlocks>);
}

cudaError_t sgd_step_fp16_master_cuda(const Fp16MasterSpan* spans, int64_t n_spans,
                                      const StepHyper& h, cudaStream_t stream) {
  return launch_elementwise<cuda::Fp16MasterMode>(spans, n_spans, h, stream);
}

#define MC_INSTANTIATE(T)                                                                   \
  template cudaError_t sgd_step_cuda_flat<T>(const Span&, const StepHyper&, cudaStream_t); \
  template cudaError_t sgd_step_cuda_list<T>(const Span*, int64_t, const StepHyper&, cudaStream_t);
MC_INSTANTIATE(float)
MC_INSTANTIATE(double)
MC_INSTANTIATE(cuda::bf16_t)
MC_INSTANTIATE(cuda::fp16_t)
#undef MC_INSTANTIATE

}  // namespace momentum_cuda
