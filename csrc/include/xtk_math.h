// Per-element math shared by the CUDA kernels (csrc/kernels/*.cu) and the CPU implementations
// (csrc/cpu/*.cpp): one definition, two drivers. Plain C++ (no torch, no CUDA types), so it
// compiles with nvcc and with g++ alike. All math is fp32.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define XTK_HD __host__ __device__ __forceinline__
#else
#define XTK_HD inline
#endif

namespace xtk {

// Element types of the raw-pointer APIs (CPU and CUDA).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Activation codes: the order of ACTIVATIONS in xtk/reference/glu.py.
enum Act : int { kGelu = 0, kGeluTanh = 1, kSilu = 2, kRelu = 3, kReluSquared = 4 };

constexpr float kSqrtHalf = 0.70710678118654752440f;      // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;    // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;   // sqrt(2 / pi)
constexpr float kGeluTanhCoef = 0.044715f;

// exp, erf and tanh for the activations. On the GPU: CUDA's own (IEEE, no fast math). On the CPU:
// branch-free polynomial forms (selects only, no libm calls) so that the CPU drivers' fp32 loops
// vectorize; errors: exp <= 2 ulp (Cephes' expf polynomial), erf and tanh <= 2e-7 absolute
// (Abramowitz & Stegun 7.1.26 for erf), well inside the 2x rule of tests/tolerance.py.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float fexp(float x) { return expf(x); }
__device__ __forceinline__ float ferf(float x) { return erff(x); }
__device__ __forceinline__ float ftanh(float x) { return tanhf(x); }
#else
inline float fexp(float x) {
  x = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline float ferf(float x) {
  const float ax = fabsf(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * fexp(-ax * ax);
  return x < 0.0f ? -y : y;
}
inline float ftanh(float x) {
  const float y = 1.0f - 2.0f / (fexp(2.0f * fabsf(x)) + 1.0f);
  return x < 0.0f ? -y : y;
}
#endif

// act(x) for the activation ACT (a compile-time constant so that inner loops carry no switch).
template <int ACT>
XTK_HD float act_fwd(float x) {
  if (ACT == kGelu) return 0.5f * x * (1.0f + ferf(x * kSqrtHalf));
  if (ACT == kGeluTanh) {
    float u = kSqrt2OverPi * (x + kGeluTanhCoef * x * x * x);
    return 0.5f * x * (1.0f + ftanh(u));
  }
  if (ACT == kSilu) return x / (1.0f + fexp(-x));
  if (ACT == kRelu) return x > 0.0f ? x : 0.0f;
  /* kReluSquared */ return x > 0.0f ? x * x : 0.0f;
}

// d act(x) / dx (relu: 0 at x == 0, as torch's threshold_backward).
template <int ACT>
XTK_HD float act_grad(float x) {
  if (ACT == kGelu) return 0.5f * (1.0f + ferf(x * kSqrtHalf)) + x * kInvSqrt2Pi * fexp(-0.5f * x * x);
  if (ACT == kGeluTanh) {
    float x2 = x * x;
    float t = ftanh(kSqrt2OverPi * (x + kGeluTanhCoef * x2 * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCoef * x2);
  }
  if (ACT == kSilu) {
    float s = 1.0f / (1.0f + fexp(-x));
    return s * (1.0f + x * (1.0f - s));
  }
  if (ACT == kRelu) return x > 0.0f ? 1.0f : 0.0f;
  /* kReluSquared */ return x > 0.0f ? 2.0f * x : 0.0f;
}

// GLU on one element pair: out = a * act(gate).
template <int ACT>
XTK_HD float glu_fwd(float a, float gate) { return a * act_fwd<ACT>(gate); }

// GLU backward on one element pair, recomputed from the input: da = dy * act(gate),
// dgate = dy * a * act'(gate).
template <int ACT>
XTK_HD void glu_bwd(float dy, float a, float gate, float* da, float* dgate) {
  *da = dy * act_fwd<ACT>(gate);
  *dgate = dy * a * act_grad<ACT>(gate);
}

// RMSNorm, x-transformers' form: y = (s / n) * sqrt(dim) * g with n = max(||s||, eps), the
// operations in the order of the eager F.normalize path (s / n is exactly +-1 for dim 1).
// The per-row value saved for the backward is n, stored NEGATED when the clamp was active
// (||s|| < eps): then n is a constant and its gradient term vanishes.
XTK_HD float rms_norm_signed(float sumsq, float eps) {
  float n = sqrtf(sumsq);
  return n < eps ? -eps : n;
}

// Backward of one row, with shat_k = s_k / n and dothat = sum_k g_k dy_k shat_k:
//   ds_k = a * (g_k dy_k - b * shat_k),  a = sqrt(dim) / n,  b = dothat (0 when clamped),
//   dg_k += sqrt(dim) * dy_k * shat_k.
XTK_HD void rms_bwd_coefs(float norm_signed, float sqrt_dim, float dothat, float* a, float* b) {
  *a = sqrt_dim / fabsf(norm_signed);
  *b = norm_signed < 0.0f ? 0.0f : dothat;
}

}  // namespace xtk
