// Torch glue of the extension xtk._C: op schemas (namespace xtk), argument checks, output
// allocation, dtype codes, and the CPU registrations. The CUDA registrations live in
// torch_ops_cuda.cpp (built only when torch has CUDA). Autograd and fake (meta) implementations
// are registered from Python (xtk/_ext.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "torch_ops.h"
#include "xtk_cpu.h"

namespace xtk {
namespace ops {
namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, name, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

int act_code(c10::string_view name) {
  static const char* names[] = {"gelu", "gelu_tanh", "silu", "relu", "relu_squared"};
  for (int i = 0; i < 5; ++i)
    if (name == names[i]) return i;
  TORCH_CHECK(false, "activation: expected one of gelu, gelu_tanh, silu, relu, relu_squared, got '",
              std::string(name), "'");
  return -1;
}

void same_as(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name, bool shape = true) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), " (", ref_name, "'s), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (", ref_name,
              "'s), got ", t.scalar_type());
  TORCH_CHECK(!shape || t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (", ref_name, "'s), got ",
              t.sizes());
}

void check_device(const at::Tensor& x) {
#ifdef XTK_WITH_CUDA
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), "x: expected a CPU or CUDA tensor, got device ", x.device());
#else
  TORCH_CHECK(x.is_cpu(), "x: expected a CPU tensor (xtk._C was built without CUDA), got device ", x.device());
#endif
}

// Gain as contiguous fp32 and its stride (1: vector of dim, 0: scalar), or (undefined, 0).
std::pair<at::Tensor, int64_t> gain(const std::optional<at::Tensor>& weight, const at::Tensor& x, int64_t dim) {
  if (!weight.has_value() || !weight->defined()) return {at::Tensor(), 0};
  const at::Tensor& w = *weight;
  TORCH_CHECK(w.device() == x.device(), "weight: expected device ", x.device(), " (x's), got ", w.device());
  TORCH_CHECK(w.is_floating_point(), "weight: expected a floating-point tensor, got ", w.scalar_type());
  const bool scalar = w.dim() == 0 || (w.dim() == 1 && w.size(0) == 1);
  TORCH_CHECK(scalar || (w.dim() == 1 && w.size(0) == dim), "weight: expected shape (", dim,
              ",) (RMSNorm) or (1,)/() (ScaleNorm), got ", w.sizes());
  return {w.to(at::kFloat).contiguous(), scalar ? 0 : 1};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& residual, double eps) {
  check_device(x);
  const int dt = dtype_code(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK(eps >= 0, "eps: expected a float >= 0, got ", eps);
  const int64_t dim = x.size(-1), rows = dim ? x.numel() / dim : 0;
  const at::Tensor xc = x.contiguous();
  auto [g, g_stride] = gain(weight, x, dim);
  const bool has_res = residual.has_value() && residual->defined();
  at::Tensor rc;
  if (has_res) {
    same_as(*residual, "residual", x, "x");
    rc = residual->contiguous();
  }
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  at::Tensor s = has_res ? at::empty_like(xc, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  at::Tensor norm = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (rows == 0 || dim == 0) return {y, s, norm};
  const float* gp = g.defined() ? g.data_ptr<float>() : nullptr;
  const void* rp = has_res ? rc.data_ptr() : nullptr;
  void* sp = has_res ? s.data_ptr() : nullptr;
  if (x.is_cpu()) {
    cpu::rms_norm_fwd(static_cast<DType>(dt), xc.data_ptr(), rp, sp, gp, g_stride, y.data_ptr(),
                      norm.data_ptr<float>(), rows, dim, static_cast<float>(eps));
  } else {
#ifdef XTK_WITH_CUDA
    cuda_hooks::rms_norm_fwd(dt, xc, rp, sp, gp, g_stride, y.data_ptr(), norm.data_ptr<float>(), rows, dim,
                             static_cast<float>(eps));
#endif
  }
  return {y, s, norm};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& ds,
                                                const at::Tensor& s, const std::optional<at::Tensor>& weight,
                                                const at::Tensor& norm, bool weight_grad) {
  check_device(s);
  const int dt = dtype_code(s, "s");
  TORCH_CHECK(s.dim() >= 1, "s: expected at least 1 dimension, got a 0-d tensor");
  same_as(dy, "dy", s, "s");
  const int64_t dim = s.size(-1), rows = dim ? s.numel() / dim : 0;
  TORCH_CHECK(norm.scalar_type() == at::kFloat && norm.numel() == rows && norm.device() == s.device(),
              "norm: expected ", rows, " float32 values on ", s.device(), " (one per row of s), got ", norm.numel(),
              " of ", norm.scalar_type(), " on ", norm.device());
  const bool has_ds = ds.has_value() && ds->defined();
  at::Tensor dsc;
  if (has_ds) {
    same_as(*ds, "ds", s, "s");
    dsc = ds->contiguous();
  }
  const at::Tensor sc = s.contiguous(), dyc = dy.contiguous(), nc = norm.contiguous();
  auto [g, g_stride] = gain(weight, s, dim);
  const bool want_dg = weight_grad && g.defined();
  at::Tensor dx = at::empty_like(sc, at::MemoryFormat::Contiguous);
  at::Tensor dg = want_dg ? at::zeros_like(*weight) : at::empty({0}, s.options().dtype(at::kFloat));
  if (rows == 0 || dim == 0) return {dx, dg};
  const float* gp = g.defined() ? g.data_ptr<float>() : nullptr;
  const void* dsp = has_ds ? dsc.data_ptr() : nullptr;
  at::Tensor partial;
  if (s.is_cpu()) {
    if (want_dg) partial = at::empty({cpu::rms_norm_bwd_partials(rows, dim), dim}, s.options().dtype(at::kDouble));
    cpu::rms_norm_bwd(static_cast<DType>(dt), dyc.data_ptr(), dsp, sc.data_ptr(), gp, g_stride,
                      nc.data_ptr<float>(), dx.data_ptr(), want_dg ? partial.data_ptr<double>() : nullptr, rows, dim);
  } else {
#ifdef XTK_WITH_CUDA
    if (want_dg)
      partial = at::empty({cuda_hooks::rms_norm_bwd_partials(dt, s, rows, dim), dim}, s.options().dtype(at::kFloat));
    cuda_hooks::rms_norm_bwd(dt, s, dyc.data_ptr(), dsp, sc.data_ptr(), gp, g_stride, nc.data_ptr<float>(),
                             dx.data_ptr(), want_dg ? partial.data_ptr<float>() : nullptr, rows, dim);
#endif
  }
  if (want_dg) {
    at::Tensor col = partial.sum(0);  // the per-block partial rows -> (dim,)
    dg = (g_stride ? col : col.sum()).reshape(weight->sizes()).to(weight->scalar_type());
  }
  return {dx, dg};
}

at::Tensor glu_fwd(const at::Tensor& x, c10::string_view activation) {
  check_device(x);
  const int dt = dtype_code(x, "x"), act = act_code(activation);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "x: expected an even last dim (2 * inner) for a GLU, got shape ",
              x.sizes());
  const int64_t inner = x.size(-1) / 2, rows = inner ? x.numel() / (2 * inner) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = inner;
  at::Tensor y = at::empty(shape, x.options());
  if (rows == 0 || inner == 0) return y;
  const at::Tensor xc = x.contiguous();
  if (x.is_cpu()) {
    cpu::glu_fwd(static_cast<DType>(dt), act, xc.data_ptr(), y.data_ptr(), rows, inner);
  } else {
#ifdef XTK_WITH_CUDA
    cuda_hooks::glu_fwd(dt, act, xc, y.data_ptr(), rows, inner);
#endif
  }
  return y;
}

at::Tensor glu_bwd(const at::Tensor& dy, const at::Tensor& x, c10::string_view activation) {
  check_device(x);
  const int dt = dtype_code(x, "x"), act = act_code(activation);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "x: expected an even last dim (2 * inner) for a GLU, got shape ",
              x.sizes());
  const int64_t inner = x.size(-1) / 2, rows = inner ? x.numel() / (2 * inner) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = inner;
  TORCH_CHECK(dy.sizes() == at::IntArrayRef(shape), "dy: expected shape ", at::IntArrayRef(shape), ", got ",
              dy.sizes());
  same_as(dy, "dy", x, "x", /*shape=*/false);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (rows == 0 || inner == 0) return dx;
  const at::Tensor xc = x.contiguous(), dyc = dy.contiguous();
  if (x.is_cpu()) {
    cpu::glu_bwd(static_cast<DType>(dt), act, dyc.data_ptr(), xc.data_ptr(), dx.data_ptr(), rows, inner);
  } else {
#ifdef XTK_WITH_CUDA
    cuda_hooks::glu_bwd(dt, act, xc, dyc.data_ptr(), dx.data_ptr(), rows, inner);
#endif
  }
  return dx;
}

at::Tensor activation_fwd(const at::Tensor& x, c10::string_view activation) {
  check_device(x);
  const int dt = dtype_code(x, "x"), act = act_code(activation);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const at::Tensor xc = x.contiguous();
  if (x.is_cpu()) {
    cpu::act_fwd(static_cast<DType>(dt), act, xc.data_ptr(), y.data_ptr(), x.numel());
  } else {
#ifdef XTK_WITH_CUDA
    cuda_hooks::act_fwd(dt, act, xc, y.data_ptr(), x.numel());
#endif
  }
  return y;
}

at::Tensor activation_bwd(const at::Tensor& dy, const at::Tensor& x, c10::string_view activation) {
  check_device(x);
  const int dt = dtype_code(x, "x"), act = act_code(activation);
  same_as(dy, "dy", x, "x");
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return dx;
  const at::Tensor xc = x.contiguous(), dyc = dy.contiguous();
  if (x.is_cpu()) {
    cpu::act_bwd(static_cast<DType>(dt), act, dyc.data_ptr(), xc.data_ptr(), dx.data_ptr(), x.numel());
  } else {
#ifdef XTK_WITH_CUDA
    cuda_hooks::act_bwd(dt, act, xc, dyc.data_ptr(), dx.data_ptr(), x.numel());
#endif
  }
  return dx;
}

}  // namespace ops
}  // namespace xtk

TORCH_LIBRARY_FRAGMENT(xtk, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, Tensor? residual, float eps) -> (Tensor y, Tensor s, Tensor norm)");
  m.def("rms_norm_bwd(Tensor dy, Tensor? ds, Tensor s, Tensor? weight, Tensor norm, bool weight_grad)"
        " -> (Tensor dx, Tensor dweight)");
  m.def("glu_fwd(Tensor x, str activation) -> Tensor");
  m.def("glu_bwd(Tensor dy, Tensor x, str activation) -> Tensor");
  m.def("activation_fwd(Tensor x, str activation) -> Tensor");
  m.def("activation_bwd(Tensor dy, Tensor x, str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(xtk, CPU, m) {
  m.impl("rms_norm_fwd", &xtk::ops::rms_norm_fwd);
  m.impl("rms_norm_bwd", &xtk::ops::rms_norm_bwd);
  m.impl("glu_fwd", &xtk::ops::glu_fwd);
  m.impl("glu_bwd", &xtk::ops::glu_bwd);
  m.impl("activation_fwd", &xtk::ops::activation_fwd);
  m.impl("activation_bwd", &xtk::ops::activation_bwd);
}

// A plain Python module (no pybind11): importing xtk._C loads the library, which registers the ops.
// Its attributes: with_cuda (0/1) and cpu_isa, the copy of the CPU loops this process runs
// ("avx512", "avx2+fma" or "baseline", fixed at import: XTK_CPU_ISA=avx2 or baseline caps the choice).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "xtk C++/CUDA ops, registered as torch.ops.xtk.*", -1,
                               nullptr};
  const char* isa = nullptr;
  try {
    isa = xtk::cpu::isa_name(xtk::cpu::isa());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  PyObject* m = PyModule_Create(&module);
  if (m) PyModule_AddStringConstant(m, "cpu_isa", isa);
#ifdef XTK_WITH_CUDA
  if (m) PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  if (m) PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
