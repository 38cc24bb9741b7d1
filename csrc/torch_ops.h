// Shared declarations of the torch glue: the device-independent op functions (torch_ops.cpp)
// and the CUDA hooks (torch_ops_cuda.cpp, compiled only when torch has CUDA: XTK_WITH_CUDA).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace xtk {
namespace ops {

// Same schemas as the TORCH_LIBRARY definitions in torch_ops.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& residual, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& ds,
                                                const at::Tensor& s, const std::optional<at::Tensor>& weight,
                                                const at::Tensor& norm, bool weight_grad);
at::Tensor glu_fwd(const at::Tensor& x, c10::string_view activation);
at::Tensor glu_bwd(const at::Tensor& dy, const at::Tensor& x, c10::string_view activation);
at::Tensor activation_fwd(const at::Tensor& x, c10::string_view activation);
at::Tensor activation_bwd(const at::Tensor& dy, const at::Tensor& x, c10::string_view activation);

}  // namespace ops

#ifdef XTK_WITH_CUDA
// CUDA hooks: same raw arguments as the CPU implementations (xtk_cpu.h), run on the current
// stream of x's device; errors raise.
namespace cuda_hooks {
void rms_norm_fwd(int dt, const at::Tensor& x, const void* residual, void* s_out, const float* g, int64_t g_stride,
                  void* y, float* norm, int64_t rows, int64_t dim, float eps);
int64_t rms_norm_bwd_partials(int dt, const at::Tensor& x, int64_t rows, int64_t dim);
void rms_norm_bwd(int dt, const at::Tensor& x, const void* dy, const void* ds_extra, const void* s, const float* g,
                  int64_t g_stride, const float* norm, void* dx, float* dg_partial, int64_t rows, int64_t dim);
void glu_fwd(int dt, int act, const at::Tensor& x, void* y, int64_t rows, int64_t inner);
void glu_bwd(int dt, int act, const at::Tensor& x, const void* dy, void* dx, int64_t rows, int64_t inner);
void act_fwd(int dt, int act, const at::Tensor& x, void* y, int64_t n);
void act_bwd(int dt, int act, const at::Tensor& x, const void* dy, void* dx, int64_t n);
}  // namespace cuda_hooks
#endif

}  // namespace xtk
