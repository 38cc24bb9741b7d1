// CUDA RMSNorm / ScaleNorm, optionally fused with the residual add: forward and backward.
// CUDA headers and the project's own headers only (TOOLCHAIN.md). Math: xtk_math.h.
//
// Layout: a row is handled by a group of TPR threads (a power of two). Short rows: TPR <= 32 and
// a 256-thread block holds 256 / TPR rows, reduced with warp shuffles; long rows: the block is
// one group of TPR (64..1024) threads, reduced through shared memory. Each thread walks its
// vectors with stride TPR: VEC elements = 16 bytes when the row length is a multiple of that and
// the pointers are 16-byte aligned (so every row is), else VEC = 1; a tail loop covers dim % VEC.
//
// Backward: each block walks many rows and keeps the gain gradient per column in shared memory
// (one slice per row group; a thread always owns the same columns, so no atomics), then writes
// one partial row; the host sums the partial rows. Columns beyond shared memory use the block's
// partial row in global memory directly.
#include "cuda_common.cuh"

#include <algorithm>

namespace xtk {
namespace cuda {
namespace {

constexpr int kSmallBlock = 256;
constexpr int kMaxSmemBytes = 48 * 1024;
constexpr int kVecsPerThread = 4;  // a row's vectors per thread (config); the forward keeps them in registers

struct Config {
  int tpr, threads, groups;
};

// Threads per row: at most kVecsPerThread vectors each (past 1024 threads, more), a power of two
// in [1, 1024].
inline Config config(int64_t dim, int elem_bytes) {
  const int64_t vmax = 16 / elem_bytes;
  const int64_t nvec = (dim + vmax - 1) / vmax;
  int tpr = 1;
  while (tpr < 1024 && tpr * kVecsPerThread < nvec) tpr *= 2;
  if (tpr <= 32) return {tpr, kSmallBlock, kSmallBlock / tpr};
  return {tpr, tpr, 1};
}

// Sum over the TPR threads of a row group (all threads of the block call it).
__device__ __forceinline__ float group_sum(float v, int tpr, float* scratch) {
  const int w = tpr < 32 ? tpr : 32;
  for (int off = w / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (tpr <= 32) return v;
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read from the previous call
  if ((threadIdx.x & 31) == 0) scratch[warp] = v;
  __syncthreads();
  float t = 0.0f;
  for (int i = 0; i < nwarps; ++i) t += scratch[i];
  return t;
}

// One vector of s at vector index v: x, or x + residual rounded to T (and stored to s_out), in fp32.
template <typename T, int VEC, bool HAS_RES>
__device__ __forceinline__ void load_s(const T* x, const T* res, T* s_out, int64_t v, float (&a)[VEC]) {
  load_pack<T, VEC>(x + v * VEC, a);
  if (HAS_RES) {
    float b[VEC];
    load_pack<T, VEC>(res + v * VEC, b);
    Pack<T, VEC> pk;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      pk.v[i] = from_f<T>(a[i] + b[i]);
      a[i] = to_f(pk.v[i]);
    }
    *reinterpret_cast<Pack<T, VEC>*>(s_out + v * VEC) = pk;
  }
}

// VEC gains from column k: a vector gain (gs != 0) as 16-byte loads when VEC is a multiple of 4
// (the launcher checks g's alignment with the rows'), else the scalar g0 repeated.
template <int VEC>
__device__ __forceinline__ void load_gain(const float* g, int64_t gs, float g0, int64_t k, float (&out)[VEC]) {
  if (gs) {
    if constexpr (VEC % 4 == 0) {
#pragma unroll
      for (int i = 0; i < VEC; i += 4) {
        const float4 f = *reinterpret_cast<const float4*>(g + k + i);
        out[i] = f.x;
        out[i + 1] = f.y;
        out[i + 2] = f.z;
        out[i + 3] = f.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = g[k + i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = g0;
  }
}

// y = s / n * sqrt(dim) * g for one vector (eager's order of operations), stored at vector index v.
template <typename T, int VEC>
__device__ __forceinline__ void store_normed(T* y, int64_t v, const float (&a)[VEC], float an, float sqrt_dim,
                                             const float* g, int64_t gs, float g0) {
  float gv[VEC], o[VEC];
  load_gain<VEC>(g, gs, g0, v * VEC, gv);
#pragma unroll
  for (int i = 0; i < VEC; ++i) o[i] = a[i] / an * sqrt_dim * gv[i];
  store_pack<T, VEC>(y + v * VEC, o);
}

// CACHED (nvec <= kVecsPerThread * tpr): the thread keeps its vectors of s in registers between the
// two passes, so x (and s) are read from memory once; else pass 2 reads s again.
template <typename T, int VEC, bool HAS_RES, bool CACHED>
__global__ void rms_norm_fwd_kernel(RmsNormFwdParams p, int tpr) {
  __shared__ float scratch[32];
  const int group = threadIdx.x / tpr, lane = threadIdx.x % tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + group;
  const bool valid = row < p.rows;
  const int64_t dim = p.dim, nvec = dim / VEC, tail0 = nvec * VEC;
  const int64_t off = valid ? row * dim : 0;
  const T* x = static_cast<const T*>(p.x) + off;
  const T* res = HAS_RES ? static_cast<const T*>(p.residual) + off : nullptr;
  T* s_out = HAS_RES ? static_cast<T*>(p.s_out) + off : nullptr;
  T* y = static_cast<T*>(p.y) + off;
  float kept[CACHED ? kVecsPerThread : 1][VEC];

  // pass 1: s (= x, or x + residual rounded to T and stored), sum of squares in fp32
  float ss = 0.0f;
  if (valid) {
    if (CACHED) {
#pragma unroll
      for (int j = 0; j < kVecsPerThread; ++j) {
        const int64_t v = lane + static_cast<int64_t>(j) * tpr;
        if (v < nvec) {
          load_s<T, VEC, HAS_RES>(x, res, s_out, v, kept[j]);
#pragma unroll
          for (int i = 0; i < VEC; ++i) ss += kept[j][i] * kept[j][i];
        }
      }
    } else {
      for (int64_t v = lane; v < nvec; v += tpr) {
        float a[VEC];
        load_s<T, VEC, HAS_RES>(x, res, s_out, v, a);
#pragma unroll
        for (int i = 0; i < VEC; ++i) ss += a[i] * a[i];
      }
    }
    for (int64_t k = tail0 + lane; k < dim; k += tpr) {
      float a = to_f(x[k]);
      if (HAS_RES) {
        T s = from_f<T>(a + to_f(res[k]));
        s_out[k] = s;
        a = to_f(s);
      }
      ss += a * a;
    }
  }
  ss = group_sum(ss, tpr, scratch);
  if (!valid) return;
  const float n = rms_norm_signed(ss, p.eps);
  if (lane == 0) p.norm[row] = n;
  const float an = fabsf(n), sqrt_dim = sqrtf(static_cast<float>(dim));

  // pass 2: y = s / n * sqrt(dim) * g (s re-read when not kept: this thread wrote it above)
  const T* s = HAS_RES ? s_out : x;
  const float* g = p.g;
  const int64_t gs = p.g_stride;
  const float g0 = g ? g[0] : 1.0f;
  if (CACHED) {
#pragma unroll
    for (int j = 0; j < kVecsPerThread; ++j) {
      const int64_t v = lane + static_cast<int64_t>(j) * tpr;
      if (v < nvec) store_normed<T, VEC>(y, v, kept[j], an, sqrt_dim, g, gs, g0);
    }
  } else {
    for (int64_t v = lane; v < nvec; v += tpr) {
      float a[VEC];
      load_pack<T, VEC>(s + v * VEC, a);
      store_normed<T, VEC>(y, v, a, an, sqrt_dim, g, gs, g0);
    }
  }
  for (int64_t k = tail0 + lane; k < dim; k += tpr) y[k] = from_f<T>(to_f(s[k]) / an * sqrt_dim * (gs ? g[k] : g0));
}

template <typename T, int VEC, bool HAS_EXTRA>
__global__ void rms_norm_bwd_kernel(RmsNormBwdParams p, int tpr, bool acc_in_smem) {
  extern __shared__ float smem[];  // [32] reduction scratch, then [groups][dim] gain sums
  float* scratch = smem;
  const int groups = blockDim.x / tpr;
  const int group = threadIdx.x / tpr, lane = threadIdx.x % tpr;
  const int64_t dim = p.dim, nvec = dim / VEC, tail0 = nvec * VEC;
  const bool want_dg = p.dg_partial != nullptr;
  float* acc = nullptr;
  if (want_dg) {
    acc = acc_in_smem ? smem + 32 + static_cast<int64_t>(group) * dim : p.dg_partial + blockIdx.x * dim;
    const int64_t total = acc_in_smem ? groups * dim : dim;
    float* base = acc_in_smem ? smem + 32 : acc;
    for (int64_t k = threadIdx.x; k < total; k += blockDim.x) base[k] = 0.0f;
    __syncthreads();
  }
  const float sqrt_dim = sqrtf(static_cast<float>(dim));
  const float* g = p.g;
  const int64_t gs = p.g_stride;
  const float g0 = g ? g[0] : 1.0f;

  const int64_t row_groups = (p.rows + groups - 1) / groups;
  for (int64_t rg = blockIdx.x; rg < row_groups; rg += gridDim.x) {
    const int64_t row = rg * groups + group;
    const bool valid = row < p.rows;
    const int64_t off = valid ? row * dim : 0;
    const T* dy = static_cast<const T*>(p.dy) + off;
    const T* s = static_cast<const T*>(p.s) + off;
    // pass 1: dothat = sum g dy shat, shat = s / n
    const float nrm = valid ? p.norm[row] : 1.0f, an = fabsf(nrm);
    float dot = 0.0f;
    if (valid) {
      for (int64_t v = lane; v < nvec; v += tpr) {
        float a[VEC], d[VEC], gv[VEC];
        load_pack<T, VEC>(s + v * VEC, a);
        load_pack<T, VEC>(dy + v * VEC, d);
        load_gain<VEC>(g, gs, g0, v * VEC, gv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) dot += gv[i] * d[i] * (a[i] / an);
      }
      for (int64_t k = tail0 + lane; k < dim; k += tpr) dot += (gs ? g[k] : g0) * to_f(dy[k]) * (to_f(s[k]) / an);
    }
    dot = group_sum(dot, tpr, scratch);
    if (!valid) continue;  // no block-wide sync below, and valid rows of a block come first
    float ca, cb;
    rms_bwd_coefs(nrm, sqrt_dim, dot, &ca, &cb);
    // pass 2: dx = ca * (g * dy - cb * shat) (+ ds_extra); gain sums += sqrt(dim) * dy * shat
    const T* ex = HAS_EXTRA ? static_cast<const T*>(p.ds_extra) + off : nullptr;
    T* dx = static_cast<T*>(p.dx) + off;
    for (int64_t v = lane; v < nvec; v += tpr) {
      float a[VEC], d[VEC], o[VEC], gv[VEC];
      load_pack<T, VEC>(s + v * VEC, a);
      load_pack<T, VEC>(dy + v * VEC, d);
      load_gain<VEC>(g, gs, g0, v * VEC, gv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        a[i] /= an;
        o[i] = ca * (gv[i] * d[i] - cb * a[i]);
      }
      if (HAS_EXTRA) {
        float e[VEC];
        load_pack<T, VEC>(ex + v * VEC, e);
#pragma unroll
        for (int i = 0; i < VEC; ++i) o[i] += e[i];
      }
      store_pack<T, VEC>(dx + v * VEC, o);
      if (want_dg) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[v * VEC + i] += sqrt_dim * d[i] * a[i];
      }
    }
    for (int64_t k = tail0 + lane; k < dim; k += tpr) {
      const float a = to_f(s[k]) / an, d = to_f(dy[k]);
      float o = ca * ((gs ? g[k] : g0) * d - cb * a);
      if (HAS_EXTRA) o += to_f(ex[k]);
      dx[k] = from_f<T>(o);
      if (want_dg) acc[k] += sqrt_dim * d * a;
    }
  }
  if (want_dg && acc_in_smem) {  // fold the row groups' slices into this block's partial row
    __syncthreads();
    float* out = p.dg_partial + blockIdx.x * dim;
    for (int64_t k = threadIdx.x; k < dim; k += blockDim.x) {
      float t = 0.0f;
      for (int gi = 0; gi < groups; ++gi) t += smem[32 + static_cast<int64_t>(gi) * dim + k];
      out[k] = t;
    }
  }
}

// The vector width; a vector gain is read in 16-byte loads too, so its alignment counts.
template <typename T>
int vec_for(const RmsNormFwdParams& p) {
  return pick_vec<T>(p.dim, p.x, p.residual, p.s_out, p.y, p.g_stride ? p.g : nullptr);
}

template <typename T>
int vec_for(const RmsNormBwdParams& p) {
  return pick_vec<T>(p.dim, p.dy, p.ds_extra, p.s, p.dx, p.g_stride ? p.g : nullptr);
}

inline int elem_bytes(DType dt) { return dt == kFloat32 ? 4 : 2; }

}  // namespace

int64_t rms_norm_bwd_partials(DType dt, int64_t rows, int64_t dim, int device) {
  const Config c = config(dim, elem_bytes(dt));
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 108;
  const int64_t row_groups = (rows + c.groups - 1) / c.groups;
  // about 1024 threads per SM: enough loads in flight, and few partial rows (each is dim floats
  // written and summed again, a few % of the row traffic at 4096 x 8192)
  const int64_t per_sm = std::max(1, 1024 / c.threads);
  return std::max<int64_t>(1, std::min<int64_t>(row_groups, sms * per_sm));
}

cudaError_t rms_norm_fwd(DType dt, const RmsNormFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return cudaSuccess;
  const Config c = config(p.dim, elem_bytes(dt));
  const int64_t blocks = (p.rows + c.groups - 1) / c.groups;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_vec<T>(vec_for<T>(p), [&](auto vt) {
      constexpr int V = decltype(vt)::value;
      const bool cached = p.dim / V <= static_cast<int64_t>(kVecsPerThread) * c.tpr;
      const unsigned grid = static_cast<unsigned>(blocks);
      if (p.residual && cached)
        rms_norm_fwd_kernel<T, V, true, true><<<grid, c.threads, 0, stream>>>(p, c.tpr);
      else if (p.residual)
        rms_norm_fwd_kernel<T, V, true, false><<<grid, c.threads, 0, stream>>>(p, c.tpr);
      else if (cached)
        rms_norm_fwd_kernel<T, V, false, true><<<grid, c.threads, 0, stream>>>(p, c.tpr);
      else
        rms_norm_fwd_kernel<T, V, false, false><<<grid, c.threads, 0, stream>>>(p, c.tpr);
      return cudaGetLastError();
    });
  });
}

cudaError_t rms_norm_bwd(DType dt, const RmsNormBwdParams& p, int device, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return cudaSuccess;
  const Config c = config(p.dim, elem_bytes(dt));
  const int64_t blocks = rms_norm_bwd_partials(dt, p.rows, p.dim, device);
  const int64_t acc_bytes = static_cast<int64_t>(c.groups) * p.dim * 4;
  const bool in_smem = p.dg_partial != nullptr && 32 * 4 + acc_bytes <= kMaxSmemBytes;
  const size_t smem = 32 * 4 + (in_smem ? acc_bytes : 0);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_vec<T>(vec_for<T>(p), [&](auto vt) {
      constexpr int V = decltype(vt)::value;
      if (p.ds_extra)
        rms_norm_bwd_kernel<T, V, true><<<static_cast<unsigned>(blocks), c.threads, smem, stream>>>(p, c.tpr, in_smem);
      else
        rms_norm_bwd_kernel<T, V, false><<<static_cast<unsigned>(blocks), c.threads, smem, stream>>>(p, c.tpr, in_smem);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace xtk
