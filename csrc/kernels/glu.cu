// CUDA GLU family (x (rows, 2*inner) -> a * act(gate)) and plain activations, forward and
// backward; the backward recomputes act from the input. CUDA headers and the project's own headers
// only. Math: xtk_math.h. Grid-stride loops over VEC-element packs (16 bytes when aligned); the
// plain activation also has a scalar tail for n % VEC.
#include "cuda_common.cuh"

#include <algorithm>

namespace xtk {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename F>
cudaError_t dispatch_act(int act, F&& f) {
  switch (act) {
    case kGelu: return f(VecTag<kGelu>{});
    case kGeluTanh: return f(VecTag<kGeluTanh>{});
    case kSilu: return f(VecTag<kSilu>{});
    case kRelu: return f(VecTag<kRelu>{});
    case kReluSquared: return f(VecTag<kReluSquared>{});
  }
  return cudaErrorInvalidValue;
}

inline unsigned grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535 * 8)));
}

template <typename T, int VEC, int ACT>
__global__ void glu_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t inner) {
  const int64_t per_row = inner / VEC, total = rows * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = (i - r * per_row) * VEC;
    const T* xr = x + r * 2 * inner + c;
    float a[VEC], gt[VEC];
    load_pack<T, VEC>(xr, a);
    load_pack<T, VEC>(xr + inner, gt);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = ::xtk::glu_fwd<ACT>(a[k], gt[k]);
    store_pack<T, VEC>(y + r * inner + c, a);
  }
}

template <typename T, int VEC, int ACT>
__global__ void glu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t rows,
                               int64_t inner) {
  const int64_t per_row = inner / VEC, total = rows * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = (i - r * per_row) * VEC;
    const T* xr = x + r * 2 * inner + c;
    T* dxr = dx + r * 2 * inner + c;
    float a[VEC], gt[VEC], d[VEC], da[VEC], dg[VEC];
    load_pack<T, VEC>(xr, a);
    load_pack<T, VEC>(xr + inner, gt);
    load_pack<T, VEC>(dy + r * inner + c, d);
#pragma unroll
    for (int k = 0; k < VEC; ++k) ::xtk::glu_bwd<ACT>(d[k], a[k], gt[k], &da[k], &dg[k]);
    store_pack<T, VEC>(dxr, da);
    store_pack<T, VEC>(dxr + inner, dg);
  }
}

template <typename T, int VEC, int ACT>
__global__ void act_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n) {
  const int64_t nvec = n / VEC, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t i = t; i < nvec; i += stride) {
    float v[VEC];
    load_pack<T, VEC>(x + i * VEC, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = ::xtk::act_fwd<ACT>(v[k]);
    store_pack<T, VEC>(y + i * VEC, v);
  }
  for (int64_t k = nvec * VEC + t; k < n; k += stride) y[k] = from_f<T>(::xtk::act_fwd<ACT>(to_f(x[k])));
}

template <typename T, int VEC, int ACT>
__global__ void act_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t n) {
  const int64_t nvec = n / VEC, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t i = t; i < nvec; i += stride) {
    float v[VEC], d[VEC];
    load_pack<T, VEC>(x + i * VEC, v);
    load_pack<T, VEC>(dy + i * VEC, d);
#pragma unroll
    for (int k = 0; k < VEC; ++k) d[k] *= ::xtk::act_grad<ACT>(v[k]);
    store_pack<T, VEC>(dx + i * VEC, d);
  }
  for (int64_t k = nvec * VEC + t; k < n; k += stride) dx[k] = from_f<T>(to_f(dy[k]) * ::xtk::act_grad<ACT>(to_f(x[k])));
}

}  // namespace

cudaError_t glu_fwd(DType dt, int act, const void* x, void* y, int64_t rows, int64_t inner, cudaStream_t stream) {
  if (rows == 0 || inner == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    // the gate half starts at x + inner: alignment of both halves and of the output rows
    const int v = pick_vec<T>(inner, xp, xp + inner, y);
    return dispatch_vec<T>(v, [&](auto vt) {
      constexpr int V = decltype(vt)::value;
      return dispatch_act(act, [&](auto at) {
        glu_fwd_kernel<T, V, decltype(at)::value><<<grid_for(rows * inner / V), kThreads, 0, stream>>>(
            xp, static_cast<T*>(y), rows, inner);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t glu_bwd(DType dt, int act, const void* dy, const void* x, void* dx, int64_t rows, int64_t inner,
                    cudaStream_t stream) {
  if (rows == 0 || inner == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    const int v = pick_vec<T>(inner, xp, xp + inner, dy, dx);
    return dispatch_vec<T>(v, [&](auto vt) {
      constexpr int V = decltype(vt)::value;
      return dispatch_act(act, [&](auto at) {
        glu_bwd_kernel<T, V, decltype(at)::value><<<grid_for(rows * inner / V), kThreads, 0, stream>>>(
            static_cast<const T*>(dy), xp, static_cast<T*>(dx), rows, inner);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t act_fwd(DType dt, int act, const void* x, void* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    // pointers aligned: vectors over n / VEC packs and a scalar tail (any n)
    const int v = pick_vec<T>(16 / sizeof(T), x, y);
    return dispatch_vec<T>(v, [&](auto vt) {
      constexpr int V = decltype(vt)::value;
      return dispatch_act(act, [&](auto at) {
        act_fwd_kernel<T, V, decltype(at)::value><<<grid_for(n / V + 1), kThreads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<T*>(y), n);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t act_bwd(DType dt, int act, const void* dy, const void* x, void* dx, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const int v = pick_vec<T>(16 / sizeof(T), x, dy, dx);
    return dispatch_vec<T>(v, [&](auto vt) {
      constexpr int V = decltype(vt)::value;
      return dispatch_act(act, [&](auto at) {
        act_bwd_kernel<T, V, decltype(at)::value><<<grid_for(n / V + 1), kThreads, 0, stream>>>(
            static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), n);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace cuda
}  // namespace xtk
