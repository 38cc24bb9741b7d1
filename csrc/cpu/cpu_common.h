// Helpers of the CPU drivers: element conversions to/from fp32, the dtype switch, and the run-time
// choice of the instruction set the loops run with (parallel_for_isa).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <stdexcept>
#include <type_traits>

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

// The rows of a loop in fp32: fp32 rows in place (no copy: in the GLU loops the copies through a
// buffer were half the time), other dtypes widened into buf; out_row() is where the fp32 results
// go, flush() stores them to T.
template <typename T>
inline const float* in_row(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same<T, float>::value) {
    return src;
  } else {
    load_row(src, buf, n);
    return buf;
  }
}
template <typename T>
inline float* out_row(T* dst, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    return dst;
  } else {
    return buf;
  }
}
template <typename T>
inline void flush(const float* buf, T* dst, int64_t n) {
  if constexpr (!std::is_same<T, float>::value) store_row(buf, dst, n);
}

// Software prefetch (for reading) of the cache lines of src[0, n). On x86 an asm volatile
// prefetcht0: gcc treats __builtin_prefetch as free of side effects, marked a lambda holding only
// prefetches `const` and deleted the calls (the GLU loops had none).
inline void prefetch_line(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}
template <typename T>
inline void prefetch_row(const T* src, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t k = 0; k < n; k += kLine) prefetch_line(src + k);
}

// The loops are compiled three times: at the baseline ISA (SSE2 on x86-64) and, on x86, with AVX2 +
// FMA and with AVX-512 (F/VL/BW/DQ, 512-bit vectors preferred: on Zen 5 its fp32 division and the
// masked selects run 2-5x faster than the AVX2 copy's); isa() picks one per process (isa.cpp);
// run_isa(f) runs f() in the chosen copy. `flatten` inlines f and everything it calls into each
// copy, so the loops vectorize for that ISA and no out-of-line function is ever compiled for AVX2
// or AVX-512 (an inline function shared with other code keeps one baseline copy: nothing AVX2 or
// AVX-512 can run on a CPU without it). The AVX2 copy gives the results of a whole build
// with -mavx2 -mfma (FMA contraction included), the AVX-512 copy those of -mavx512{f,vl,bw,dq}
// -mprefer-vector-width=512, the baseline copy those of a build without.
template <typename F>
__attribute__((flatten, noinline)) void run_baseline(const F& f) {
  f();
}
#if XTK_CPU_AVX2
template <typename F>
__attribute__((flatten, noinline, target("avx2,fma"))) void run_avx2(const F& f) {
  f();
}
#if defined(__clang__)  // clang takes no vector-width preference in a target attribute
#define XTK_AVX512_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"
#else
#define XTK_AVX512_TARGET "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512"
#endif
template <typename F>
__attribute__((flatten, noinline, target(XTK_AVX512_TARGET))) void run_avx512(const F& f) {
  f();
}
#endif

template <typename F>
inline void run_isa(const F& f) {
#if XTK_CPU_AVX2
  if (isa() == Isa::kAvx512) return run_avx512(f);
  if (isa() == Isa::kAvx2) return run_avx2(f);
#endif
  run_baseline(f);
}

// at::parallel_for whose body f(begin, end) runs in the copy compiled for this process's ISA.
template <typename F>
inline void parallel_for_isa(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t lo, int64_t hi) { run_isa([&] { f(lo, hi); }); });
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

// Sum of a[k] * b[k] in T (float or double) with L independent lanes (vectorizes without
// fast-math; more lanes, more independent add chains), folded pairwise to 8, scalar tail. The
// order is fixed by L alone: every ISA copy gives the same result.
template <typename T, int L = 8>
inline T dot_lanes(const T* a, const T* b, int64_t n) {
  static_assert(L >= 8 && L % 8 == 0, "lanes: a multiple of 8");
  T acc[L] = {};
  int64_t k = 0;
  for (; k + L <= n; k += L)
    for (int l = 0; l < L; ++l) acc[l] += a[k + l] * b[k + l];
  for (int w = L / 2; w >= 8; w /= 2)  // fold to 8 lanes, pairwise
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  T tail = 0;
  for (; k < n; ++k) tail += a[k] * b[k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

}  // namespace cpu
}  // namespace xtk
