// Per-element math shared by the CUDA kernels (csrc/kernels/*.cu) and the CPU implementations
// (csrc/cpu/*.cpp): one definition, two drivers. Plain C++ (no torch, no CUDA types), so it
// compiles with nvcc and with g++ alike. All math is fp32.
#pragma once

#include <math.h>

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

// act(x) for the activation ACT (a compile-time constant so that inner loops carry no switch).
template <int ACT>
XTK_HD float act_fwd(float x) {
  if (ACT == kGelu) return 0.5f * x * (1.0f + erff(x * kSqrtHalf));
  if (ACT == kGeluTanh) {
    float u = kSqrt2OverPi * (x + kGeluTanhCoef * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
  }
  if (ACT == kSilu) return x / (1.0f + expf(-x));
  if (ACT == kRelu) return x > 0.0f ? x : 0.0f;
  /* kReluSquared */ return x > 0.0f ? x * x : 0.0f;
}

// d act(x) / dx (relu: 0 at x == 0, as torch's threshold_backward).
template <int ACT>
XTK_HD float act_grad(float x) {
  if (ACT == kGelu) return 0.5f * (1.0f + erff(x * kSqrtHalf)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
  if (ACT == kGeluTanh) {
    float x2 = x * x;
    float t = tanhf(kSqrt2OverPi * (x + kGeluTanhCoef * x2 * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCoef * x2);
  }
  if (ACT == kSilu) {
    float s = 1.0f / (1.0f + expf(-x));
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
