// CPU RMSNorm / ScaleNorm (optionally fused with the residual add), forward and backward.
// Rows are split over threads with parallel_for_isa; fp32 rows are read and written in place,
// other dtypes widened once into fp32 buffers (in_row / out_row), and the math comes from
// xtk_math.h (shared with the CUDA kernels), in the copy of the loops compiled for this CPU
// (cpu_common.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "xtk_math.h"

namespace xtk {
namespace cpu {
namespace {

// y = (s / |n|) * sqrt(dim) * g for s = x (+ residual, rounded to T as eager does, written to s_out).
template <typename T>
void fwd_impl(const T* x, const T* res, T* s_out, const float* g, int64_t g_stride, T* y, float* norm,
              int64_t rows, int64_t dim, float eps) {
  const float sqrt_dim = std::sqrt(static_cast<float>(dim));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1));
  parallel_for_isa(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> xb(dim), rb(res ? dim : 0), sb(dim), yb(dim);
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict__ sr = in_row(x + r * dim, xb.data(), dim);
      if (res) {
        const float* __restrict__ xr = sr;
        const float* __restrict__ rr = in_row(res + r * dim, rb.data(), dim);
        T* st = s_out + r * dim;
        float* __restrict__ so = out_row(st, sb.data());
        for (int64_t k = 0; k < dim; ++k) so[k] = xr[k] + rr[k];
        flush(so, st, dim);
        sr = in_row(st, sb.data(), dim);  // the rounded sum (fp32: the same values, in place)
      }
      const float n = rms_norm_signed(dot_lanes<float, 64>(sr, sr, dim), eps);
      norm[r] = n;
      const float an = std::fabs(n), g0 = g ? g[0] : 1.0f;
      T* yt = y + r * dim;
      float* __restrict__ yr = out_row(yt, yb.data());
      if (g && g_stride) {
        for (int64_t k = 0; k < dim; ++k) yr[k] = sr[k] / an * sqrt_dim * g[k];
      } else {
        for (int64_t k = 0; k < dim; ++k) yr[k] = sr[k] / an * sqrt_dim * g0;
      }
      flush(yr, yt, dim);
    }
  });
}

// dx = a * (g * dy - b * shat), shat = s / |n|, a = sqrt(dim) / |n|, b = sum(g * dy * shat) (0 for the
// signed-norm branch: rms_bwd_coefs); gain terms sqrt(dim) * dy * shat. Two passes over a row: shat,
// g * dy and their dot (64 lanes: the 8-lane dot's dependency chain was the loop's bottleneck), then
// dx and the gain terms. The form keeps dx = g * dy - b * shat's cancellation exact where eager's is
// (dim 1: shat = +-1).
template <typename T>
void bwd_impl(const T* dy, const T* ds_extra, const T* s, const float* g, int64_t g_stride, const float* norm,
              T* dx, double* dg_partial, int64_t rows, int64_t dim) {
  const float sqrt_dim = std::sqrt(static_cast<float>(dim));
  const int64_t parts = rms_norm_bwd_partials(rows, dim);
  // One part = a contiguous range of rows with its own gain-gradient partial row: no second pass
  // over s for dg, no atomics; the caller sums the parts.
  parallel_for_isa(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    std::vector<float> sb(dim), dyb(dim), gdy(dim), sh(dim), outb(dim), extra(ds_extra ? dim : 0);
    const float g0 = g ? g[0] : 1.0f;
    for (int64_t p = pbegin; p < pend; ++p) {
      const int64_t r0 = p * rows / parts, r1 = (p + 1) * rows / parts;
      double* __restrict__ dgp = dg_partial ? dg_partial + p * dim : nullptr;
      if (dgp) std::fill(dgp, dgp + dim, 0.0);
      for (int64_t r = r0; r < r1; ++r) {
        const float* __restrict__ sr = in_row(s + r * dim, sb.data(), dim);
        const float* __restrict__ dyr = in_row(dy + r * dim, dyb.data(), dim);
        float* __restrict__ gd = gdy.data();
        float* __restrict__ shat = sh.data();
        const float an = std::fabs(norm[r]);
        if (g && g_stride) {
          for (int64_t k = 0; k < dim; ++k) gd[k] = g[k] * dyr[k], shat[k] = sr[k] / an;
        } else {
          for (int64_t k = 0; k < dim; ++k) gd[k] = g0 * dyr[k], shat[k] = sr[k] / an;
        }
        float a, b;
        rms_bwd_coefs(norm[r], sqrt_dim, dot_lanes<float, 64>(gd, shat, dim), &a, &b);
        T* dxt = dx + r * dim;
        float* __restrict__ out = out_row(dxt, outb.data());
        if (dgp) {  // the gain terms in the same pass as dx
          for (int64_t k = 0; k < dim; ++k) {
            out[k] = a * (gd[k] - b * shat[k]);
            dgp[k] += static_cast<double>(sqrt_dim * dyr[k] * shat[k]);
          }
        } else {
          for (int64_t k = 0; k < dim; ++k) out[k] = a * (gd[k] - b * shat[k]);
        }
        if (ds_extra) {
          const float* __restrict__ ex = in_row(ds_extra + r * dim, extra.data(), dim);
          for (int64_t k = 0; k < dim; ++k) out[k] += ex[k];
        }
        flush(out, dxt, dim);
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
