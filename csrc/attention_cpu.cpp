// xtk::attention_distance_fwd / _bwd (CPU): attention whose logits carry a per-distance additive
// term (ALiBi / T5 / DistanceTable / causal, as one vector over the distances), optionally top-k,
// forward and backward with the gradient of that vector -- the chunked CPU backend's position-bias
// path (xtk/ops/attention_chunked.py, ``plan.ext``) in ONE parallel region per call.
//
// Why here: the same math as a chunk loop of torch ops runs dozens of small parallel regions per
// chunk, and torch's OpenMP threads spin-wait at each region's end; beside other busy processes a
// spinning thread takes the core its partner needs and every region stalls for a scheduler slice
// (issue 16: a T5 training step went from 0.48x to 1.36x x-transformers' time with two busy
// processes). Here one at::parallel_for hands out (batch, head, row group) tasks one at a time; a
// task runs its row blocks with single-threaded BLAS calls and fused row loops, and owns its
// outputs (no atomics, no locks). at::cpu::* calls inside the region run inline.
//
// Math per row block (rows i, keys j < nkc; P, dP, dS in the work dtype T = float or double):
//   S = scale * Q K^T, then + bias (rounded apart, as the reference), bias(i, j) = 0 for memory
//   keys j < k_prefix, else rvec[nq - 1 - i + j]; top-k: S < the row's topk-th largest -> -inf
//   P = softmax_j(S) (a row of only -inf gives P = 0, lse -inf);  O = P V
//   backward: P recomputed (same blocks, same values, same top-k set);  dV += P^T dO;  dP = dO V^T
//   D = rowsum(P * dP);  dS = P * (dP - D);  dQ = scale * dS K;  dK += scale * dS^T Q
//   g_rvec[nq - 1 - i + j] += dS(i, j) (j >= k_prefix), in float64.
// Rows of one causal block see keys up to the block's last position only (the rest are -inf in
// rvec anyway). exp: xtk_math.h's fexp for float (<= 2 ulp; masked entries give exactly 0),
// std::exp for double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/cpu_common.h"
#include "xtk_math.h"

namespace xtk {
namespace ops {
namespace {

inline float exp_of(float x) { return x < -87.0f ? 0.0f : fexp(x); }  // fexp clamps; -inf must give 0
inline double exp_of(double x) { return std::exp(x); }

constexpr int kLanes = 8;  // independent accumulators: reductions vectorize without fast-math

template <typename T>
inline T row_max(const T* s, int64_t n) {
  const T ninf = -std::numeric_limits<T>::infinity();
  T acc[kLanes] = {ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = s[k + l] > acc[l] ? s[k + l] : acc[l];
  T mx = ninf;
  for (; k < n; ++k) mx = s[k] > mx ? s[k] : mx;
  for (int l = 0; l < kLanes; ++l) mx = acc[l] > mx ? acc[l] : mx;
  return mx;
}

// s (n) <- exp(s - mx); -> the sum.
template <typename T>
inline T exp_sum_row(T* s, T mx, int64_t n) {
  T acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      s[k + l] = exp_of(s[k + l] - mx);
      acc[l] += s[k + l];
    }
  T tail = 0;
  for (; k < n; ++k) {
    s[k] = exp_of(s[k] - mx);
    tail += s[k];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// The k-th largest of s (n > k >= 1), NaN counted as +inf (a NaN row is NaN after exp anyway: this
// only has to stay well defined); tmp (n) is scratch. The least of the
// maxima of k disjoint runs of s is at most the k-th largest (they are k distinct entries): one
// vectorized pass finds it, a second keeps only the entries >= it (usually a few dozen; runs of 8
// entries below it are skipped by one vector test), and nth_element picks among those.
template <typename T>
inline T kth_largest(const T* s, int64_t n, int64_t k, T* tmp) {
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t run = n / k;
  T lo = inf;
  for (int64_t l = 0; l < k; ++l) {
    const T* r = s + l * run;
    const int64_t len = l == k - 1 ? n - l * run : run;
    const T mx = row_max(r, len);  // NaN is never taken: the bound is a finite entry's, or -inf
    lo = mx < lo ? mx : lo;
  }
  int64_t m = 0, j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    int hits = 0;
    for (int l = 0; l < kLanes; ++l) hits += !(s[j + l] < lo);  // >= lo, or NaN
    if (!hits) continue;
    for (int l = 0; l < kLanes; ++l)
      if (!(s[j + l] < lo)) tmp[m++] = s[j + l] != s[j + l] ? inf : s[j + l];
  }
  for (; j < n; ++j)
    if (!(s[j] < lo)) tmp[m++] = s[j] != s[j] ? inf : s[j];
  std::nth_element(tmp, tmp + k - 1, tmp + m, std::greater<T>());
  return tmp[k - 1];
}

// s (n) <- the logits, rounded as the reference rounds them: scale * s, then + bias (two roundings,
// never one FMA: top-k compares these values); bias 0 on [0, kp), rv[j] on [kp, n). With
// 0 < topk < n, the logits below the row's topk-th largest become -inf (ties kept; NaN, which makes
// the row NaN anyway, counts as the largest), tmp (n) is scratch. -> the row's max (-inf: no key;
// a NaN logit is not taken by the max: exp then makes the row NaN, which the caller's checks see).
template <typename T>
inline T logits_row(T* s, const T* rv, int64_t n, int64_t kp, T scale, int64_t topk, T* tmp) {
  const int64_t p = std::min(kp, n);
  for (int64_t j = 0; j < n; ++j) s[j] *= scale;
  const T mx = std::max(row_max(s, p), [&] {
    for (int64_t j = p; j < n; ++j) s[j] += rv[j];
    return row_max(s + p, n - p);
  }());
  // the row's trailing -inf (the keys a causal block's earlier rows cannot see) are its smallest
  // entries: never candidates. Left in, the search's run bound became -inf and its selection took
  // the whole row (the causal top-k forward ran 2.1x the plain causal one)
  const T ninf = -std::numeric_limits<T>::infinity();
  int64_t m = n;
  while (m > 0 && s[m - 1] == ninf) --m;
  if (topk <= 0 || topk >= m) return mx;
  const T kth = kth_largest(s, m, topk, tmp);
  for (int64_t j = 0; j < m; ++j) s[j] = s[j] < kth ? ninf : s[j];
  return mx;  // top-k drops values below the kth only: the max stays
}

// s (n) <- exp(s - mx), unnormalized; -> the sum (0 for a row with no key, mx = -inf: then s = 0).
template <typename T>
inline T exp_row(T* s, T mx, int64_t n) {
  if (mx == -std::numeric_limits<T>::infinity()) {
    std::fill(s, s + n, T(0));
    return T(0);
  }
  return exp_sum_row(s, mx, n);
}

// s (n) <- softmax(s) given its max (as logits_row gives it); zeros for a row with no key.
template <typename T>
inline void softmax_row(T* s, T mx, int64_t n) {
  const T sum = exp_row(s, mx, n);
  if (sum == T(0)) return;
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
}

// dp (n) <- ds = p * (dp - rowsum(p * dp)); g[j] += ds[j] on [kp, n) in float64 (g may be null).
template <typename T>
inline void ds_row(const T* p, T* dp, double* g, int64_t n, int64_t kp) {
  const T d = cpu::dot_lanes(p, dp, n);
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
  if (g)
    for (int64_t j = std::min(kp, n); j < n; ++j) g[j] += static_cast<double>(dp[j]);
}

struct Sizes {
  int64_t b, h, hk, nq, nk, d, dv, hv, block_rows, groups, rows_per_group, k_prefix, q_offset, topk;
  bool causal;
  double scale;
};

// Keys a block ending at query row i1 can see (causal: up to its last row's position).
int64_t keys_for(const Sizes& z, int64_t i1) {
  if (!z.causal) return z.nk;
  const int64_t last = z.k_prefix + z.q_offset + i1;
  return std::max<int64_t>(1, std::min(z.nk, std::max(last, z.k_prefix)));
}

// One task's place: batch bi, query head hi, its kv head, rows [r0, r1), and ``slot``, the index
// of its own accumulators (row group grp of head bh).
struct Task {
  int64_t bi, hi, kv, r0, r1, grp, slot;
};

// Sets the row grouping of z: at least min_tasks tasks (0: 4 per thread), row groups of whole blocks.
void plan_groups(Sizes& z, int64_t min_tasks) {
  const int64_t heads = z.b * z.h, blocks = (z.nq + z.block_rows - 1) / z.block_rows;
  const int64_t want = min_tasks > 0 ? min_tasks : 4 * at::get_num_threads();
  z.groups = std::max<int64_t>(1, std::min(blocks, (want + heads - 1) / std::max<int64_t>(1, heads)));
  z.rows_per_group = ((blocks + z.groups - 1) / z.groups) * z.block_rows;
}

// Runs f(task, p_buf, dp_buf) for every non-empty task in one parallel region. Tasks are handed
// out one at a time, largest first (a causal group's cost grows with its last row): beside other
// busy processes a thread may get half a core, and the threads that run take over its share.
template <typename F>
void for_tasks(const Sizes& z, const at::TensorOptions& opt, const F& f) {
  const int64_t heads = z.b * z.h;
  if (z.nq == 0 || z.nk == 0) return;
  const int64_t tasks = heads * z.groups;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    at::Tensor p_buf = at::empty({z.block_rows * z.nk}, opt), dp_buf = at::empty({z.block_rows * z.nk}, opt);
    for (int64_t t = next++; t < tasks; t = next++) {
      const int64_t grp = z.groups - 1 - t / heads, bh = t % heads, bi = bh / z.h, hi = bh % z.h;
      const Task task{bi, hi, hi / (z.h / z.hk), grp * z.rows_per_group,
                      std::min(z.nq, (grp + 1) * z.rows_per_group), grp, bh * z.groups + grp};
      if (task.r0 < task.r1) f(task, p_buf, dp_buf);
    }
  });
}

at::Tensor block(const at::Tensor& buf, int64_t c, int64_t nkc) { return buf.narrow(0, 0, c * nkc).view({c, nkc}); }

// Forward of one task: out rows (c, dv) and lse rows of (bi, hi).
template <typename T>
void fwd_task(const Sizes& z, const Task& t, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const T* rvec, at::Tensor& out, T* lse, at::Tensor& p_buf) {
  const int64_t R = z.nq + z.nk - 1;
  const at::Tensor qh = q[t.bi][t.hi], kh = k[t.bi][t.kv], vh = v[t.bi][t.kv], oh = out[t.bi][t.hi];
  const T* rv = rvec + (z.hv == 1 ? 0 : t.hi) * R;
  T* lse_h = lse + (t.bi * z.h + t.hi) * z.nq;
  std::vector<T> tmp(z.topk > 0 ? z.nk : 0), inv(z.block_rows);
  for (int64_t i0 = t.r0; i0 < t.r1; i0 += z.block_rows) {
    const int64_t i1 = std::min(t.r1, i0 + z.block_rows), c = i1 - i0, nkc = keys_for(z, i1);
    at::Tensor p = block(p_buf, c, nkc), ob = oh.slice(0, i0, i1);
    at::cpu::mm_out(p, qh.slice(0, i0, i1), kh.slice(0, 0, nkc).t());
    T* pp = p.data_ptr<T>();
    cpu::run_isa([&] {
      for (int64_t r = 0; r < c; ++r) {
        T* row = pp + r * nkc;
        const T mx = logits_row(row, rv + z.nq - 1 - (i0 + r), nkc, z.k_prefix, static_cast<T>(z.scale), z.topk,
                                tmp.data());
        const T sum = exp_row(row, mx, nkc);
        inv[r] = sum == T(0) ? T(0) : T(1) / sum;
        lse_h[i0 + r] = sum == T(0) ? mx : mx + std::log(sum);
      }
    });
    at::cpu::mm_out(ob, p, vh.slice(0, 0, nkc));  // unnormalized: each row scaled by 1 / sum below
    T* op = ob.data_ptr<T>();
    for (int64_t r = 0; r < c; ++r)
      for (int64_t j = 0; j < z.dv; ++j) op[r * z.dv + j] *= inv[r];
  }
}

// Backward of one task: dq rows of (bi, hi) are its own; dk, dv (nk, d|dv) and g (R,) or null
// are this task's accumulators.
template <typename T>
void bwd_task(const Sizes& z, const Task& t, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& go, const T* rvec, at::Tensor& dq, at::Tensor dk, at::Tensor dv, double* g,
              at::Tensor& p_buf, at::Tensor& dp_buf) {
  const int64_t R = z.nq + z.nk - 1;
  const at::Tensor qh = q[t.bi][t.hi], kh = k[t.bi][t.kv], vh = v[t.bi][t.kv], goh = go[t.bi][t.hi];
  const T* rv = rvec + (z.hv == 1 ? 0 : t.hi) * R;
  std::vector<T> tmp(z.topk > 0 ? z.nk : 0);
  for (int64_t i0 = t.r0; i0 < t.r1; i0 += z.block_rows) {
    const int64_t i1 = std::min(t.r1, i0 + z.block_rows), c = i1 - i0, nkc = keys_for(z, i1);
    const at::Tensor qb = qh.slice(0, i0, i1), gob = goh.slice(0, i0, i1);
    const at::Tensor kc = kh.slice(0, 0, nkc), vc = vh.slice(0, 0, nkc);
    at::Tensor p = block(p_buf, c, nkc), dp = block(dp_buf, c, nkc);
    at::cpu::mm_out(p, qb, kc.t());
    at::cpu::mm_out(dp, gob, vc.t());
    T* pp = p.data_ptr<T>();
    T* dpp = dp.data_ptr<T>();
    cpu::run_isa([&] {
      for (int64_t r = 0; r < c; ++r) {
        const int64_t off = z.nq - 1 - (i0 + r);
        const T mx = logits_row(pp + r * nkc, rv + off, nkc, z.k_prefix, static_cast<T>(z.scale), z.topk, tmp.data());
        softmax_row(pp + r * nkc, mx, nkc);
        ds_row(pp + r * nkc, dpp + r * nkc, g ? g + off : nullptr, nkc, z.k_prefix);
      }
    });
    at::Tensor dvc = dv.slice(0, 0, nkc), dkc = dk.slice(0, 0, nkc), dqb = dq[t.bi][t.hi].slice(0, i0, i1);
    at::cpu::addmm_out(dvc, dvc, p.t(), gob);
    at::cpu::addmm_out(dqb, dqb, dp, kc, /*beta=*/0, /*alpha=*/z.scale);
    at::cpu::addmm_out(dkc, dkc, dp.t(), qb, /*beta=*/1, /*alpha=*/z.scale);
  }
}

// Checks q, k, v (and grad_out when defined) and rvec; -> the sizes (row grouping unset).
Sizes check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& go,
                 const at::Tensor& rvec, double scale, int64_t k_prefix, int64_t q_offset, bool causal, int64_t topk,
                 int64_t block_rows) {
  TORCH_CHECK(q.is_cpu(), "q: expected a CPU tensor, got device ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "q: expected dtype float32 or float64 (the work dtype), got ", q.scalar_type());
  const at::Tensor& gq = go.defined() ? go : q;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && gq.dim() == 4,
              "q, k, v, grad_out: expected 4-D (b, h, n, d) tensors, got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes(), ", ", gq.sizes());
  const struct { const at::Tensor& t; const char* name; } others[] = {{k, "k"}, {v, "v"}, {gq, "grad_out"},
                                                                        {rvec, "rvec"}};
  for (const auto& o : others) {
    TORCH_CHECK(o.t.is_cpu() && o.t.scalar_type() == q.scalar_type(), o.name, ": expected a CPU ",
                q.scalar_type(), " tensor (q's), got ", o.t.scalar_type(), " on ", o.t.device());
  }
  const int64_t b = q.size(0), h = q.size(1), nq = q.size(2), hk = k.size(1), nk = k.size(2);
  TORCH_CHECK(k.size(0) == b && v.size(0) == b && hk > 0 && h % hk == 0 && v.size(1) == hk && v.size(2) == nk &&
                  k.size(3) == q.size(3) && (!go.defined() || (go.size(0) == b && go.size(1) == h &&
                                                               go.size(2) == nq && go.size(3) == v.size(3))),
              "q, k, v, grad_out: expected (b, h, nq, d), (b, hk, nk, d), (b, hk, nk, dv), (b, h, nq, dv) with h a "
              "multiple of hk, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes(), ", ", gq.sizes());
  TORCH_CHECK(rvec.dim() == 2 && (rvec.size(0) == 1 || rvec.size(0) == h) && rvec.size(1) == nq + nk - 1,
              "rvec: expected shape (1 or h=", h, ", nq + nk - 1=", nq + nk - 1, "), got ", rvec.sizes());
  TORCH_CHECK(k_prefix >= 0 && k_prefix <= nk, "k_prefix: expected 0 <= k_prefix <= nk=", nk, ", got ", k_prefix);
  TORCH_CHECK(block_rows >= 1, "block_rows: expected >= 1, got ", block_rows);
  TORCH_CHECK(topk >= 0, "topk: expected >= 0 (0: no top-k), got ", topk);
  return Sizes{b, h, hk, nq, nk, q.size(3), v.size(3), rvec.size(0), block_rows, 1, 0, k_prefix, q_offset, topk,
               causal, scale};
}

}  // namespace

// -> (out (b, h, nq, dv), lse (b, h, nq): natural log, -inf for a row with no key), in q's dtype.
std::tuple<at::Tensor, at::Tensor> attention_distance_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, const at::Tensor& rvec_in,
                                                          double scale, int64_t k_prefix, int64_t q_offset, bool causal,
                                                          int64_t topk, int64_t block_rows, int64_t min_tasks) {
  Sizes z = check_args(q_in, k_in, v_in, at::Tensor(), rvec_in, scale, k_prefix, q_offset, causal, topk, block_rows);
  plan_groups(z, min_tasks);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), rvec = rvec_in.contiguous();
  at::Tensor out = at::zeros({z.b, z.h, z.nq, z.dv}, q.options());
  at::Tensor lse = at::full({z.b, z.h, z.nq}, -std::numeric_limits<double>::infinity(), q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_distance_fwd", [&] {
    const scalar_t* rv = rvec.data_ptr<scalar_t>();
    scalar_t* lp = lse.data_ptr<scalar_t>();
    for_tasks(z, q.options(), [&](const Task& t, at::Tensor& p_buf, at::Tensor&) {
      fwd_task<scalar_t>(z, t, q, k, v, rv, out, lp, p_buf);
    });
  });
  return {out, lse};
}

// -> (dq (b, h, nq, d), dk (b, hk, nk, d), dv (b, hk, nk, dv) in q's dtype; g_rvec (1|h, nq + nk - 1)
// float64, the gradient of rvec, zeros unless bias_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_distance_bwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& go_in,
    const at::Tensor& rvec_in, double scale, int64_t k_prefix, int64_t q_offset, bool causal, int64_t topk,
    bool bias_grad, int64_t block_rows, int64_t min_tasks) {
  Sizes z = check_args(q_in, k_in, v_in, go_in, rvec_in, scale, k_prefix, q_offset, causal, topk, block_rows);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), go = go_in.contiguous();
  const at::Tensor rvec = rvec_in.contiguous();
  const int64_t R = z.nq + z.nk - 1;
  at::Tensor dq = at::zeros(q.sizes(), q.options()), dk, dv, g;
  plan_groups(z, min_tasks);
  const bool own_kv = z.groups == 1 && z.h == z.hk;  // a task owns its kv head's dk/dv
  dk = at::zeros(own_kv ? k.sizes() : at::IntArrayRef{z.b, z.h, z.groups, z.nk, z.d}, q.options());
  dv = at::zeros(own_kv ? v.sizes() : at::IntArrayRef{z.b, z.h, z.groups, z.nk, z.dv}, q.options());
  g = at::zeros({bias_grad ? z.b * z.h * z.groups : 0, R}, q.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_distance_bwd", [&] {
    const scalar_t* rv = rvec.data_ptr<scalar_t>();
    double* gp = bias_grad ? g.data_ptr<double>() : nullptr;
    for_tasks(z, q.options(), [&](const Task& t, at::Tensor& p_buf, at::Tensor& dp_buf) {
      at::Tensor dkt = own_kv ? dk[t.bi][t.hi] : dk[t.bi][t.hi][t.grp];
      at::Tensor dvt = own_kv ? dv[t.bi][t.hi] : dv[t.bi][t.hi][t.grp];
      bwd_task<scalar_t>(z, t, q, k, v, go, rv, dq, dkt, dvt, gp ? gp + t.slot * R : nullptr, p_buf, dp_buf);
    });
  });
  if (!own_kv) {  // sum the row groups and the query heads of each kv head (h = kv * r + t)
    dk = dk.sum(2).view({z.b, z.hk, z.h / z.hk, z.nk, z.d}).sum(2);
    dv = dv.sum(2).view({z.b, z.hk, z.h / z.hk, z.nk, z.dv}).sum(2);
  }
  at::Tensor g_rvec = bias_grad ? g.view({z.b, z.h, z.groups, R}).sum(at::IntArrayRef{0, 2})
                                : at::zeros({z.hv, R}, q.options().dtype(at::kDouble));
  if (bias_grad && z.hv == 1) g_rvec = g_rvec.sum(0, /*keepdim=*/true);
  return {dq, dk, dv, g_rvec};
}

}  // namespace ops
}  // namespace xtk

TORCH_LIBRARY_FRAGMENT(xtk, m) {
  m.def("attention_distance_fwd(Tensor q, Tensor k, Tensor v, Tensor rvec, float scale, int k_prefix, int q_offset, "
        "bool causal, int topk, int block_rows, int min_tasks) -> (Tensor out, Tensor lse)");
  m.def("attention_distance_bwd(Tensor q, Tensor k, Tensor v, Tensor grad_out, Tensor rvec, float scale, "
        "int k_prefix, int q_offset, bool causal, int topk, bool bias_grad, int block_rows, int min_tasks) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor g_rvec)");
}

TORCH_LIBRARY_IMPL(xtk, CPU, m) {
  m.impl("attention_distance_fwd", &xtk::ops::attention_distance_fwd);
  m.impl("attention_distance_bwd", &xtk::ops::attention_distance_bwd);
}
