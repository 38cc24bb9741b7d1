// CUDA half of the torch glue, compiled only when torch has CUDA (XTK_WITH_CUDA): the current
// stream and device guard around the raw launchers of csrc/kernels/*.cu, and the CUDA
// registrations of the ops defined in torch_ops.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "torch_ops.h"
#include "xtk_cuda.h"

namespace xtk {
namespace cuda_hooks {
namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "xtk CUDA ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }

}  // namespace

void rms_norm_fwd(int dt, const at::Tensor& x, const void* residual, void* s_out, const float* g, int64_t g_stride,
                  void* y, float* norm, int64_t rows, int64_t dim, float eps) {
  c10::cuda::CUDAGuard guard(x.device());
  cuda::RmsNormFwdParams p{x.data_ptr(), residual, s_out, g, g_stride, y, norm, rows, dim, eps};
  check(cuda::rms_norm_fwd(static_cast<DType>(dt), p, stream_of(x)), "rms_norm_fwd");
}

int64_t rms_norm_bwd_partials(int dt, const at::Tensor& x, int64_t rows, int64_t dim) {
  return cuda::rms_norm_bwd_partials(static_cast<DType>(dt), rows, dim, x.device().index());
}

void rms_norm_bwd(int dt, const at::Tensor& x, const void* dy, const void* ds_extra, const void* s, const float* g,
                  int64_t g_stride, const float* norm, void* dx, float* dg_partial, int64_t rows, int64_t dim) {
  c10::cuda::CUDAGuard guard(x.device());
  cuda::RmsNormBwdParams p{dy, ds_extra, s, g, g_stride, norm, dx, dg_partial, rows, dim};
  check(cuda::rms_norm_bwd(static_cast<DType>(dt), p, x.device().index(), stream_of(x)), "rms_norm_bwd");
}

void glu_fwd(int dt, int act, const at::Tensor& x, void* y, int64_t rows, int64_t inner) {
  c10::cuda::CUDAGuard guard(x.device());
  check(cuda::glu_fwd(static_cast<DType>(dt), act, x.data_ptr(), y, rows, inner, stream_of(x)), "glu_fwd");
}

void glu_bwd(int dt, int act, const at::Tensor& x, const void* dy, void* dx, int64_t rows, int64_t inner) {
  c10::cuda::CUDAGuard guard(x.device());
  check(cuda::glu_bwd(static_cast<DType>(dt), act, dy, x.data_ptr(), dx, rows, inner, stream_of(x)), "glu_bwd");
}

void act_fwd(int dt, int act, const at::Tensor& x, void* y, int64_t n) {
  c10::cuda::CUDAGuard guard(x.device());
  check(cuda::act_fwd(static_cast<DType>(dt), act, x.data_ptr(), y, n, stream_of(x)), "activation_fwd");
}

void act_bwd(int dt, int act, const at::Tensor& x, const void* dy, void* dx, int64_t n) {
  c10::cuda::CUDAGuard guard(x.device());
  check(cuda::act_bwd(static_cast<DType>(dt), act, dy, x.data_ptr(), dx, n, stream_of(x)), "activation_bwd");
}

}  // namespace cuda_hooks
}  // namespace xtk

TORCH_LIBRARY_IMPL(xtk, CUDA, m) {
  m.impl("rms_norm_fwd", &xtk::ops::rms_norm_fwd);
  m.impl("rms_norm_bwd", &xtk::ops::rms_norm_bwd);
  m.impl("glu_fwd", &xtk::ops::glu_fwd);
  m.impl("glu_bwd", &xtk::ops::glu_bwd);
  m.impl("activation_fwd", &xtk::ops::activation_fwd);
  m.impl("activation_bwd", &xtk::ops::activation_bwd);
}
