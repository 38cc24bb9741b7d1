// CUDA launchers of the extension (csrc/kernels/*.cu): raw pointers, sizes, a dtype code and a
// stream. Only CUDA runtime types here, so both the .cu files and the torch glue
// (csrc/torch_ops_cuda.cpp) include it. Data is contiguous row-major; every launcher returns the
// launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "xtk_math.h"

namespace xtk {
namespace cuda {

struct RmsNormFwdParams {
  const void* x;         // (rows, dim)
  const void* residual;  // (rows, dim) or null
  void* s_out;           // (rows, dim) x + residual, written when residual is given
  const float* g;        // gain in fp32, or null
  int64_t g_stride;      // 1: vector gain (RMSNorm), 0: scalar gain (ScaleNorm)
  void* y;               // (rows, dim)
  float* norm;           // (rows,) max(||s||, eps), negated when clamped
  int64_t rows, dim;
  float eps;
};

struct RmsNormBwdParams {
  const void* dy;        // (rows, dim)
  const void* ds_extra;  // (rows, dim) gradient of the new residual stream, or null
  const void* s;         // (rows, dim) the normalized input (x, or x + residual)
  const float* g;        // as in the forward
  int64_t g_stride;
  const float* norm;     // (rows,) from the forward
  void* dx;              // (rows, dim)
  float* dg_partial;     // (rms_norm_bwd_partials(...), dim) per-block gain-gradient sums, or null
  int64_t rows, dim;
};

// Rows of dg_partial the backward writes on `device` for these sizes (the caller sums them).
int64_t rms_norm_bwd_partials(DType dt, int64_t rows, int64_t dim, int device);

cudaError_t rms_norm_fwd(DType dt, const RmsNormFwdParams& p, cudaStream_t stream);
cudaError_t rms_norm_bwd(DType dt, const RmsNormBwdParams& p, int device, cudaStream_t stream);

// GLU on (rows, 2 * inner) -> (rows, inner) and its backward (dx of (rows, 2 * inner)).
cudaError_t glu_fwd(DType dt, int act, const void* x, void* y, int64_t rows, int64_t inner, cudaStream_t stream);
cudaError_t glu_bwd(DType dt, int act, const void* dy, const void* x, void* dx, int64_t rows, int64_t inner,
                    cudaStream_t stream);

// Plain activation on n elements.
cudaError_t act_fwd(DType dt, int act, const void* x, void* y, int64_t n, cudaStream_t stream);
cudaError_t act_bwd(DType dt, int act, const void* dy, const void* x, void* dx, int64_t n, cudaStream_t stream);

}  // namespace cuda
}  // namespace xtk
