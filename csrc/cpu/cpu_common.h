// Helpers of the CPU drivers: element conversions to/from fp32 and the dtype switch.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <stdexcept>

#include "xtk_cpu.h"

namespace xtk {
namespace cpu {

// Converting loads/stores; loops over these vectorize (SIMD) for fp32 and bf16.
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(src[k]);
}
template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<T>(src[k]);
}

// Calls f(T{}) with T the element type of dt.
template <typename F>
inline void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case kFloat32: f(float{}); return;
    case kFloat16: f(c10::Half{}); return;
    case kBFloat16: f(c10::BFloat16{}); return;
  }
  throw std::invalid_argument("xtk cpu: unsupported dtype code");
}

// Sum of a[k] * b[k] in fp32 with 8 independent lanes (vectorizes without fast-math), scalar tail.
inline float dot_lanes(const float* a, const float* b, int64_t n) {
  constexpr int L = 8;
  float acc[L] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + L <= n; k += L)
    for (int l = 0; l < L; ++l) acc[l] += a[k + l] * b[k + l];
  float tail = 0.0f;
  for (; k < n; ++k) tail += a[k] * b[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

}  // namespace cpu
}  // namespace xtk
