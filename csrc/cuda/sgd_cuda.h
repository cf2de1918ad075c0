// sgd_cuda.h — the CUDA launchers' interface: plain pointers, scalars and a stream; no ATen.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cpu/momentum_cpu.h"  // Span, MasterSpan, SrSpan, Bf16MomSpan, Q8Span, Fp16MasterSpan,
                                // StepHyper
#include "storage_types.h"

namespace momentum_cuda {

/// Flat step over one span (numel may exceed 2^31). T: float, double, cuda::bf16_t, cuda::fp16_t.
/// Returns the error of the occupancy query (first call per device) or of the launch
/// (cudaSuccess when nothing was launched).
template <class T>
cudaError_t sgd_step_cuda_flat(const Span& span, const StepHyper& hyper, cudaStream_t stream);

/// Per-tensor step over many spans: as many multi-tensor launches as the argument space needs.
template <class T>
cudaError_t sgd_step_cuda_list(const Span* spans, int64_t n_spans, const StepHyper& hyper,
                               cudaStream_t stream);

/// Master-weights step over many spans (bf16 parameters with fp32 masters, bf16_split.h):
/// as many launches of the master kernel as the argument space needs. hyper.dev is not read;
/// hyper.amp.found_inf != 0 skips the step on the device (no other AmpPtrs are read).
cudaError_t sgd_step_master_cuda(const MasterSpan* spans, int64_t n_spans, const StepHyper& hyper,
                                 cudaStream_t stream);

/// Stochastic-rounding step over many spans (stochastic.h): as many launches of the SR
/// kernel as the argument space needs. hyper.dev is not read; hyper.amp.found_inf != 0 skips
/// the step.
cudaError_t sgd_step_sr_cuda(const SrSpan* spans, int64_t n_spans, const StepHyper& hyper,
                             cudaStream_t stream);

/// momentum_dtype=torch.bfloat16 step over many spans (momentum_dtype.h: fp32 parameters, bf16
/// buffers): as many launches as the argument space needs. hyper.dev is not read;
/// hyper.amp.found_inf != 0 skips the step.
cudaError_t sgd_step_bf16mom_cuda(const Bf16MomSpan* spans, int64_t n_spans,
                                  const StepHyper& hyper, cudaStream_t stream);

/// momentum_dtype=torch.int8 step over many spans (momentum_dtype.h: fp32 parameters, int8
/// codes with a scale per kQBlock elements): as many launches as the argument space needs.
/// hyper.dev is not read; hyper.amp.found_inf != 0 skips the step.
cudaError_t sgd_step_q8_cuda(const Q8Span* spans, int64_t n_spans, const StepHyper& hyper,
                             cudaStream_t stream);

/// fp16 master-weights step over many spans (fp16_master.h: fp16 parameters, fp32 masters and
/// buffers): as many launches as the argument space needs. hyper.dev is not read;
/// hyper.amp.found_inf != 0 skips the step.
cudaError_t sgd_step_fp16_master_cuda(const Fp16MasterSpan* spans, int64_t n_spans,
                                      const StepHyper& hyper, cudaStream_t stream);

}  // namespace momentum_cuda
