// CPU RMSNorm / ScaleNorm (optionally fused with the residual add), forward and backward.
// Rows are split over threads with parallel_for_isa; each row is widened once into an fp32
// buffer, and the math comes from xtk_math.h (shared with the CUDA kernels), in the copy of
// the loops compiled for this CPU (cpu_common.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "xtk_math.h"

namespace xtk {
namespace cpu {
namespace {

template <typename T>
void fwd_impl(const T* x, const T* res, T* s_out, const float* g, int64_t g_stride, T* y, float* norm,
              int64_t rows, int64_t dim, float eps) {
  const float sqrt_dim = std::sqrt(static_cast<float>(dim));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1));
  parallel_for_isa(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(dim), tmp(res ? dim : 0);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * dim;
      load_row(xr, buf.data(), dim);
      if (res) {  // s = x + residual, rounded to T (as eager does), then normalized
        load_row(res + r * dim, tmp.data(), dim);
        T* sr = s_out + r * dim;
        for (int64_t k = 0; k < dim; ++k) sr[k] = static_cast<T>(buf[k] + tmp[k]);
        load_row(sr, buf.data(), dim);
      }
      const float n = rms_norm_signed(dot_lanes(buf.data(), buf.data(), dim), eps);
      norm[r] = n;
      const float an = std::fabs(n);
      T* yr = y + r * dim;
      if (g && g_stride) {
        for (int64_t k = 0; k < dim; ++k) yr[k] = static_cast<T>(buf[k] / an * sqrt_dim * g[k]);
      } else {
        const float g0 = g ? g[0] : 1.0f;
        for (int64_t k = 0; k < dim; ++k) yr[k] = static_cast<T>(buf[k] / an * sqrt_dim * g0);
      }
    }
  });
}

template <typename T>
void bwd_impl(const T* dy, const T* ds_extra, const T* s, const float* g, int64_t g_stride, const float* norm,
              T* dx, double* dg_partial, int64_t rows, int64_t dim) {
  const float sqrt_dim = std::sqrt(static_cast<float>(dim));
  const int64_t parts = rms_norm_bwd_partials(rows, dim);
  // One part = a contiguous range of rows with its own gain-gradient partial row: no second pass
  // over s for dg, no atomics; the caller sums the parts.
  parallel_for_isa(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    std::vector<float> sb(dim), gdy(dim), dyb(dim), out(dim), extra(ds_extra ? dim : 0);
    for (int64_t p = pbegin; p < pend; ++p) {
      const int64_t r0 = p * rows / parts, r1 = (p + 1) * rows / parts;
      double* dgp = dg_partial ? dg_partial + p * dim : nullptr;
      if (dgp) std::fill(dgp, dgp + dim, 0.0);
      for (int64_t r = r0; r < r1; ++r) {
        load_row(s + r * dim, sb.data(), dim);
        load_row(dy + r * dim, dyb.data(), dim);
        if (g && g_stride) {
          for (int64_t k = 0; k < dim; ++k) gdy[k] = g[k] * dyb[k];
        } else {
          const float g0 = g ? g[0] : 1.0f;
          for (int64_t k = 0; k < dim; ++k) gdy[k] = g0 * dyb[k];
        }
        const float an = std::fabs(norm[r]);
        for (int64_t k = 0; k < dim; ++k) sb[k] /= an;  // shat
        float a, b;
        rms_bwd_coefs(norm[r], sqrt_dim, dot_lanes(gdy.data(), sb.data(), dim), &a, &b);
        for (int64_t k = 0; k < dim; ++k) out[k] = a * (gdy[k] - b * sb[k]);
        if (ds_extra) {
          load_row(ds_extra + r * dim, extra.data(), dim);
          for (int64_t k = 0; k < dim; ++k) out[k] += extra[k];
        }
        store_row(out.data(), dx + r * dim, dim);
        if (dgp)
          for (int64_t k = 0; k < dim; ++k) dgp[k] += static_cast<double>(sqrt_dim * dyb[k] * sb[k]);
      }
    }
  });
}

}  // namespace

int64_t rms_norm_bwd_partials(int64_t rows, int64_t dim) {
  (void)dim;
  const int64_t by_rows = (rows + 7) / 8;  // at least 8 rows per part
  const int64_t by_threads = 4 * static_cast<int64_t>(at::get_num_threads());
  return std::max<int64_t>(1, std::min(by_rows, by_threads));
}

void rms_norm_fwd(DType dt, const void* x, const void* residual, void* s_out, const float* g, int64_t g_stride,
                  void* y, float* norm, int64_t rows, int64_t dim, float eps) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    fwd_impl<T>(static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<T*>(s_out), g, g_stride,
                static_cast<T*>(y), norm, rows, dim, eps);
  });
}

void rms_norm_bwd(DType dt, const void* dy, const void* ds_extra, const void* s, const float* g, int64_t g_stride,
                  const float* norm, void* dx, double* dg_partial, int64_t rows, int64_t dim) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    bwd_impl<T>(static_cast<const T*>(dy), static_cast<const T*>(ds_extra), static_cast<const T*>(s), g, g_stride,
                norm, static_cast<T*>(dx), dg_partial, rows, dim);
  });
}

}  // namespace cpu
}  // namespace xtk
