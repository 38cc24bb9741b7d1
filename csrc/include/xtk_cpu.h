// CPU implementations of the extension's ops on raw pointers (csrc/cpu/*.cpp). Contiguous
// row-major data; float accumulation; called by the torch glue in csrc/torch_ops.cpp.
#pragma once

#include <cstdint>

#include "xtk_math.h"

namespace xtk {
namespace cpu {

// The instruction set the vectorized loops run with, chosen once per process (x86 builds): kAvx512
// when the CPU has AVX-512 F/VL/BW/DQ (with AVX2 and FMA), else kAvx2 when it has AVX2 and FMA, else
// kBaseline. XTK_CPU_ISA=baseline or avx2 caps the choice at that copy. Throws std::invalid_argument
// for any other XTK_CPU_ISA than auto, avx2, baseline or unset.
enum class Isa { kBaseline, kAvx2, kAvx512 };
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define XTK_CPU_AVX2 1  // the AVX2 and AVX-512 copies are built (gcc / clang on x86)
#else
#define XTK_CPU_AVX2 0
#endif
Isa isa();
const char* isa_name(Isa isa);

// y = rmsnorm(s) with s = x (+ residual, then written to s_out); g (fp32) has stride g_stride (0 for
// ScaleNorm) or is null; norm gets max(||s||, eps) per row, negated when clamped.
void rms_norm_fwd(DType dt, const void* x, const void* residual, void* s_out, const float* g, int64_t g_stride,
                  void* y, float* norm, int64_t rows, int64_t dim, float eps);

// How many partial rows of the gain gradient rms_norm_bwd writes (the caller allocates
// (rms_norm_bwd_partials(rows, dim), dim) doubles and sums them over dim 0). A part sums hundreds
// of rows in sequence, so its running sums are kept in double (the rows' math stays fp32).
int64_t rms_norm_bwd_partials(int64_t rows, int64_t dim);

// dx = d rmsnorm / ds applied to dy, plus ds_extra (the new residual stream's own gradient, may
// be null); dg_partial (may be null) gets per-part sums of sqrt(dim) * dy * s / |norm|.
void rms_norm_bwd(DType dt, const void* dy, const void* ds_extra, const void* s, const float* g, int64_t g_stride,
                  const float* norm, void* dx, double* dg_partial, int64_t rows, int64_t dim);

// GLU on (rows, 2 * inner) -> (rows, inner); backward gives dx of (rows, 2 * inner).
void glu_fwd(DType dt, int act, const void* x, void* y, int64_t rows, int64_t inner);
void glu_bwd(DType dt, int act, const void* dy, const void* x, void* dx, int64_t rows, int64_t inner);

// Plain activation on n elements.
void act_fwd(DType dt, int act, const void* x, void* y, int64_t n);
void act_bwd(DType dt, int act, const void* dy, const void* x, void* dx, int64_t n);

}  // namespace cpu
}  // namespace xtk
