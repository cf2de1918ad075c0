// sgd_cuda.cu — launchers of the kernels in sgd_kernel.cuh (grid sizes, argument packing).
//
// Inputs : spans validated by csrc/momentum_ops.cpp (device, dtype, sizes, overlap), the
//          current stream and device already set by the caller.
// Grid   : the flat kernel runs 256 threads a block and at most 4 blocks per SM-worth of work
//          (grid-stride beyond that); the multi-tensor kernel one block per 65536-element chunk.
#include "sgd_cuda.h"

#include <vector>

#include "sgd_kernel.cuh"

namespace momentum_cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
using Opmath = typename cuda::Storage<T>::opmath;

template <class T>
cuda::CudaScalars<T> scalars(const StepHyper& h) {
  // On CUDA torch keeps every alpha in opmath (no narrowing to bf16/fp16, unlike its CPU path).
  return make_scalars<Opmath<T>>(h.lr, h.momentum, h.dampening, h.weight_decay,
                                 [](double v) { return static_cast<Opmath<T>>(v); });
}

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return sms > 0 ? sms : 1;
}

}  // namespace

template <class T>
cudaError_t sgd_step_cuda_flat(const Span& span, const StepHyper& h, cudaStream_t stream) {
  if (span.numel == 0) return cudaSuccess;
  const cuda::FlatArgs<T> a{static_cast<T*>(span.param), static_cast<T*>(span.buf),
                            static_cast<const T*>(span.grad), span.numel, scalars<T>(h), h.flags};
  const int64_t per_block = static_cast<int64_t>(kThreads) * cuda::Pack<T>::kN;
  const int64_t want = (span.numel + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 8;  // enough blocks to fill the GPU
  const unsigned blocks = static_cast<unsigned>(want < cap ? want : cap);
  cuda::sgd_flat_kernel<T><<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <class T>
cudaError_t sgd_step_cuda_list(const Span* spans, int64_t n_spans, const StepHyper& h,
                               cudaStream_t stream) {
  std::vector<T*> params(n_spans), bufs(n_spans);
  std::vector<const T*> grads(n_spans);
  std::vector<int64_t> numels(n_spans);
  for (int64_t k = 0; k < n_spans; ++k) {
    params[k] = static_cast<T*>(spans[k].param);
    bufs[k] = static_cast<T*>(spans[k].buf);
    grads[k] = static_cast<const T*>(spans[k].grad);
    numels[k] = spans[k].numel;
  }
  cudaError_t err = cudaSuccess;
#if CUDART_VERSION >= 12010
  using L = cuda::ListLimits32K;  // 32 KB of kernel arguments: CUDA >= 12.1 on sm_70+
#else
  using L = cuda::ListLimits4K;  // older toolkits: the classic 4 KB
#endif
  cuda::plan_list<T, L>(params.data(), (h.flags & kMomentum) ? bufs.data() : nullptr,
                        grads.data(), numels.data(), n_spans, scalars<T>(h), h.flags,
                        [&](const cuda::ListArgs<T, L::kTensors, L::kBlocks>& a, int blocks) {
                          if (err != cudaSuccess) return;
                          cuda::sgd_list_kernel<T, L::kTensors, L::kBlocks>
                              <<<blocks, kThreads, 0, stream>>>(a);
                          err = cudaGetLastError();
                        });
  return err;
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
