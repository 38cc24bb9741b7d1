// CPU GLU family and plain activations, forward and backward (recomputed from the input).
// Elements are processed in fp32 chunks of kChunk; the math comes from xtk_math.h; the loops run in
// the copy compiled for this CPU (parallel_for_isa, cpu_common.h).
#include <ATen/Parallel.h>

#include <algorithm>
#include <stdexcept>
#include <type_traits>

#include "cpu_common.h"
#include "xtk_math.h"

namespace xtk {
namespace cpu {
namespace {

constexpr int64_t kChunk = 256;
// Chunks prefetched ahead (kAhead * kChunk elements per input stream, 4 KiB in fp32). The GLU rows
// read a and gate from alternate 4 KiB pages, which the hardware prefetchers follow too late for the
// activations' long per-vector math: GELU's forward ran at half the speed of the same loop over
// separate arrays (Zen 5, AVX-512 copy: 3.1 -> 1.5 ms per 4000 x 1024, one thread).
constexpr int64_t kAhead = 8;

template <typename F>
void dispatch_act(int act, F&& f) {
  switch (act) {
    case kGelu: f(std::integral_constant<int, kGelu>{}); return;
    case kGeluTanh: f(std::integral_constant<int, kGeluTanh>{}); return;
    case kSilu: f(std::integral_constant<int, kSilu>{}); return;
    case kRelu: f(std::integral_constant<int, kRelu>{}); return;
    case kReluSquared: f(std::integral_constant<int, kReluSquared>{}); return;
  }
  throw std::invalid_argument("xtk cpu: unknown activation code");
}

// Runs body(row, col0, n) over (rows, cols) in chunks of at most kChunk columns, in parallel; before
// each chunk, prefetch(row, col0, n) of the chunk kAhead places later in the same thread's range.
template <typename P, typename F>
void for_chunks(int64_t rows, int64_t cols, P&& prefetch, F&& body) {
  const int64_t per_row = (cols + kChunk - 1) / kChunk;
  parallel_for_isa(0, rows * per_row, std::max<int64_t>(1, 8192 / kChunk), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + kAhead < end) {
        const int64_t j = i + kAhead, c0 = (j % per_row) * kChunk;
        prefetch(j / per_row, c0, std::min(kChunk, cols - c0));
      }
      const int64_t r = i / per_row, c0 = (i % per_row) * kChunk;
      body(r, c0, std::min(kChunk, cols - c0));
    }
  });
}

template <typename T, int ACT>
void glu_fwd_impl(const T* x, T* y, int64_t rows, int64_t inner) {
  auto prefetch = [&](int64_t r, int64_t c0, int64_t n) {
    prefetch_row(x + r * 2 * inner + c0, n);
    prefetch_row(x + r * 2 * inner + inner + c0, n);
  };
  for_chunks(rows, inner, prefetch, [&](int64_t r, int64_t c0, int64_t n) {
    float ab[kChunk], gb[kChunk], ob[kChunk];
    const T* xr = x + r * 2 * inner;
    const float* __restrict__ a = in_row(xr + c0, ab, n);
    const float* __restrict__ gt = in_row(xr + inner + c0, gb, n);
    T* yr = y + r * inner + c0;
    float* __restrict__ o = out_row(yr, ob);
    for (int64_t k = 0; k < n; ++k) o[k] = ::xtk::glu_fwd<ACT>(a[k], gt[k]);
    flush(o, yr, n);
  });
}

template <typename T, int ACT>
void glu_bwd_impl(const T* dy, const T* x, T* dx, int64_t rows, int64_t inner) {
  auto prefetch = [&](int64_t r, int64_t c0, int64_t n) {
    prefetch_row(x + r * 2 * inner + c0, n);
    prefetch_row(x + r * 2 * inner + inner + c0, n);
    prefetch_row(dy + r * inner + c0, n);
  };
  for_chunks(rows, inner, prefetch, [&](int64_t r, int64_t c0, int64_t n) {
    float ab[kChunk], gb[kChunk], db[kChunk], dab[kChunk], dgb[kChunk];
    const T* xr = x + r * 2 * inner;
    const float* __restrict__ a = in_row(xr + c0, ab, n);
    const float* __restrict__ gt = in_row(xr + inner + c0, gb, n);
    const float* __restrict__ d = in_row(dy + r * inner + c0, db, n);
    T* dxr = dx + r * 2 * inner;
    float* __restrict__ da = out_row(dxr + c0, dab);
    float* __restrict__ dg = out_row(dxr + inner + c0, dgb);
    for (int64_t k = 0; k < n; ++k) ::xtk::glu_bwd<ACT>(d[k], a[k], gt[k], &da[k], &dg[k]);
    flush(da, dxr + c0, n);
    flush(dg, dxr + inner + c0, n);
  });
}

template <typename T, int ACT>
void act_fwd_impl(const T* x, T* y, int64_t n_all) {
  auto prefetch = [&](int64_t, int64_t c0, int64_t n) { prefetch_row(x + c0, n); };
  for_chunks(1, n_all, prefetch, [&](int64_t, int64_t c0, int64_t n) {
    float vb[kChunk], ob[kChunk];
    const float* __restrict__ v = in_row(x + c0, vb, n);
    float* __restrict__ o = out_row(y + c0, ob);
    for (int64_t k = 0; k < n; ++k) o[k] = ::xtk::act_fwd<ACT>(v[k]);
    flush(o, y + c0, n);
  });
}

template <typename T, int ACT>
void act_bwd_impl(const T* dy, const T* x, T* dx, int64_t n_all) {
  auto prefetch = [&](int64_t, int64_t c0, int64_t n) {
    prefetch_row(x + c0, n);
    prefetch_row(dy + c0, n);
  };
  for_chunks(1, n_all, prefetch, [&](int64_t, int64_t c0, int64_t n) {
    float vb[kChunk], db[kChunk], ob[kChunk];
    const float* __restrict__ v = in_row(x + c0, vb, n);
    const float* __restrict__ d = in_row(dy + c0, db, n);
    float* __restrict__ o = out_row(dx + c0, ob);
    for (int64_t k = 0; k < n; ++k) o[k] = d[k] * ::xtk::act_grad<ACT>(v[k]);
    flush(o, dx + c0, n);
  });
}

}  // namespace

void glu_fwd(DType dt, int act, const void* x, void* y, int64_t rows, int64_t inner) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    dispatch_act(act, [&](auto a) {
      glu_fwd_impl<T, decltype(a)::value>(static_cast<const T*>(x), static_cast<T*>(y), rows, inner);
    });
  });
}

void glu_bwd(DType dt, int act, const void* dy, const void* x, void* dx, int64_t rows, int64_t inner) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    dispatch_act(act, [&](auto a) {
      glu_bwd_impl<T, decltype(a)::value>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx),
                                          rows, inner);
    });
  });
}

void act_fwd(DType dt, int act, const void* x, void* y, int64_t n) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    dispatch_act(act, [&](auto a) { act_fwd_impl<T, decltype(a)::value>(static_cast<const T*>(x), static_cast<T*>(y), n); });
  });
}

void act_bwd(DType dt, int act, const void* dy, const void* x, void* dx, int64_t n) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    dispatch_act(act, [&](auto a) {
      act_bwd_impl<T, decltype(a)::value>(static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<T*>(dx), n);
    });
  });
}

}  // namespace cpu
}  // namespace xtk
