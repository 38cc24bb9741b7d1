// Device helpers of the CUDA kernels: element conversions, packed (vector) loads, dispatch.
// CUDA headers only (no torch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "xtk_cuda.h"
#include "xtk_math.h"

namespace xtk {
namespace cuda {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements moved as one aligned access (16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[N]) {
  Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f(pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Vector width (elements) for rows of `len` elements: 16 bytes when `len` is a multiple of it and
// every pointer is 16-byte aligned, else 1 (scalar). Two widths only, to keep compile time down.
template <typename T>
inline int pick_vec(int64_t len, const void* p0, const void* p1 = nullptr, const void* p2 = nullptr,
                    const void* p3 = nullptr, const void* p4 = nullptr) {
  const int v = 16 / static_cast<int>(sizeof(T));
  bool ok = len % v == 0;
  for (const void* p : {p0, p1, p2, p3, p4}) ok = ok && (reinterpret_cast<uintptr_t>(p) % 16 == 0);
  return ok ? v : 1;
}

// Calls f(T{}) with T the device element type of dt.
template <typename F>
inline cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case kFloat32: return f(float{});
    case kFloat16: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Compile-time int tag (vector widths, activation codes).
template <int V>
struct VecTag {
  static constexpr int value = V;
};

// Calls f(VecTag<16 / sizeof(T)>) when v > 1, else f(VecTag<1>).
template <typename T, typename F>
inline cudaError_t dispatch_vec(int v, F&& f) {
  if (v > 1) return f(VecTag<16 / sizeof(T)>{});
  return f(VecTag<1>{});
}

}  // namespace cuda
}  // namespace xtk
