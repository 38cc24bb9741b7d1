"""Attention: xtk (auto backend) vs the eager reference vs SDPA (dense bias / no bias) vs flex_attention.

Features: no bias, ALiBi, T5, DistanceTable, top-k (k=8), QK-norm, rotary+xpos, QK-norm with rotary+xpos, and one
combination (DistanceTable + QK-norm + rotary/xpos); causal and not; forward (under no_grad) and
forward+backward (T5/DistanceTable tables learned, so their gradients are part of the step).

Baselines, same inputs:
* ``eager``: ``xtk.attention(..., backend="eager")``, the materialized reference (scores, bias and
  softmax as x-transformers computes them).
* ``sdpa``: ``F.scaled_dot_product_attention`` with the bias built as a dense ``(h, n, n)`` float
  mask every call (QK-norm / rotary applied to q, k first); top-k has no SDPA form (skipped).
* ``sdpa-nobias``: plain SDPA with only the causal flag: the speed of light for the device.
* ``flex``: ``torch.nn.attention.flex_attention`` compiled, with the bias as a ``score_mod`` and
  causal as a block mask; its compile time (first call) is reported separately. On CPU forward only:
  torch's flex_attention has no CPU backward ("FlexAttention does not support backward on CPU").

FLOPs: ``4 b h nq nk d`` forward (halved when causal), 3.5x that for forward+backward.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F

import xtk
from xtk.bias import Alibi, DistanceTable, T5, alibi_slopes
from xtk.qk import QKNorm, Rotary, rotary_inv_freq, xpos_scale
from xtk.reference.attention import _rotate_qk, qk_norm_apply

from .common import Result, measure, timed_step

FEATURES = ["none", "alibi", "t5", "dtable", "topk8", "qknorm", "rotary_xpos", "qknorm_rotary", "combo"]
IMPLS = ["xtk", "eager", "sdpa", "sdpa-nobias", "flex"]
MODES = ["fwd", "fwd+bwd"]

# eager materializes (b, h, n, n) several times over: past this many bytes on CPU it is reported as
# OOM without running (a real CPU OOM kills the process instead of raising)
CPU_EAGER_LIMIT_BYTES = 24 * 2**30
# flex_attention compiles each (feature, causal) anew, 3-7 s on 2 CPU cores: the quick CPU sweep keeps
# ALiBi, causal (the training case), inside its 2-minute budget; --full measures every row (top-k has
# no flex form and says so in every sweep)
QUICK_CPU_FLEX = {"alibi", "topk8"}


def sweep(device: str, full: bool):
    """(b, h, n, d) shapes: the issue's sweep behind --full (n 512..16k at 16k tokens, hd 64/128,
    16 heads); a small quick default."""
    if full:
        return [(max(1, 16384 // n), 16, n, d) for d in (64, 128) for n in (512, 1024, 2048, 4096, 8192, 16384)]
    if device == "cuda":
        return [(max(1, 16384 // n), 16, n, 128) for n in (1024, 4096)]
    return [(1, 8, 512, 64)]


def _inputs(feature: str, b, h, n, d, dtype, device, grad: bool, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
    q, k, v = rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d)
    kw = {}
    if feature in ("alibi",):
        kw["bias"] = Alibi(torch.tensor(alibi_slopes(h), device=device))
    if feature == "t5":
        table = (torch.randn(32, h, generator=g) * 0.1).to(device).requires_grad_(grad)
        kw["bias"] = T5(table, num_buckets=32, max_distance=128, scale=d ** 0.5)
    if feature in ("dtable", "combo"):
        table = (torch.randn(2 * n - 1, h, generator=g) * 0.1).to(device).requires_grad_(grad)
        kw["bias"] = DistanceTable(table)
    if feature == "topk8":
        kw["topk"] = 8
    if feature in ("qknorm", "qknorm_rotary", "combo"):
        kw["qk_norm"] = QKNorm(groups=1, scale=10.0)
    if feature in ("rotary_xpos", "qknorm_rotary", "combo"):
        rd = max(32, d // 2)
        kw["rotary"] = Rotary(rd, rotary_inv_freq(rd, device=device), xpos_scale=xpos_scale(rd, device=device))
    return q, k, v, kw


def flops(b, h, n, d, causal: bool, mode: str) -> float:
    f = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def _prep_qk(q, k, kw, n):
    """QK-norm / rotary as the baselines apply them before a plain kernel; -> q, k, scale."""
    scale = None
    if kw.get("qk_norm") is not None:
        qn = kw["qk_norm"]
        q, k, scale = qk_norm_apply(q, qn.groups, None), qk_norm_apply(k, qn.groups, None), qn.scale
    if kw.get("rotary") is not None:
        q, k = _rotate_qk(q, k, kw["rotary"], 0, 0)
    return q, k, scale


def _dense_bias(kw, h, n, causal, dtype):
    bias = kw.get("bias")
    m = None if bias is None else bias.materialize(h, n, n, 0, 0).to(dtype)
    if causal:
        tri = torch.ones(n, n, dtype=torch.bool, device=(m.device if m is not None else None)).triu(1)
        m = torch.zeros(n, n, dtype=dtype, device=tri.device) if m is None else m
        m = m.masked_fill(tri, float("-inf"))
    return m


def _compile_without_fallback(fn):
    """``torch.compile(fn)`` for a baseline that must run compiled or fail. Every flex cell compiles
    flex_attention anew (its own score_mod, block mask, shapes), and past dynamo's recompile limit
    (8 by default) dynamo silently runs the function *eagerly* -- for flex_attention the unfused
    math path, quadratic in memory (an H200 gpucheck timed T5 causal flex at 42 ms and 13 GB
    against 2.8 ms non-causal). So: a high limit, an error when it is hit, and fullgraph=True (a
    graph break raises instead of falling back)."""
    import torch._dynamo.config as dynamo_config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 4096)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
    dynamo_config.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=False, fullgraph=True)


def _flex_fn(kw, h, n, causal, device, nk=None, q_offset=0, enable_gqa=False):
    """(compiled flex_attention callable(q, k, v, scale), reason-if-unavailable): ``n`` query rows at
    positions ``q_offset + i`` over ``nk`` (default ``n``) keys at positions ``j``."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as e:
        return None, f"torch has no flex_attention ({type(e).__name__})"
    if kw.get("topk") is not None:
        return None, "top-k has no score_mod form"
    nk = n if nk is None else nk
    bias = kw.get("bias")
    if isinstance(bias, Alibi):
        slopes = torch.cat([bias.slopes, bias.slopes.new_zeros(h - bias.slopes.shape[0])])

        def score_mod(score, b, hh, qi, kj):
            return score - slopes[hh] * (qi + q_offset - kj).abs()
    elif isinstance(bias, (T5, DistanceTable)):
        # per-head vector over the signed distance (qi + q_offset) - kj, looked up per score
        dist = torch.arange(-(nk - 1), n + q_offset, device=device)
        if isinstance(bias, T5):
            from xtk.bias import t5_bucket
            vec = bias.table[t5_bucket(-dist, bias.num_buckets, bias.max_distance, bias.causal)] * bias.scale
        else:
            L = (bias.table.shape[0] + 1) // 2
            vec = bias.table[dist + L - 1]
        vec = vec.t().contiguous()  # (h, n + q_offset + nk - 1)

        def score_mod(score, b, hh, qi, kj):
            return score + vec[hh, qi + q_offset - kj + (nk - 1)]
    else:
        score_mod = None
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, hh, qi, kj: qi + q_offset >= kj, None, None, n, nk, device=device)
    compiled = _compile_without_fallback(flex_attention)

    def call(q, k, v, scale):
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    return call, None


def make_call(impl: str, feature: str, shape, causal: bool, mode: str, dtype, device) -> tuple[Optional[callable], str]:
    """-> (a zero-argument callable that runs one step, or None with the reason it cannot)."""
    b, h, n, d = shape
    grad = mode == "fwd+bwd"
    q, k, v, kw = _inputs(feature, b, h, n, d, dtype, device, grad)
    go = torch.randn(b, h, n, d, device=device, dtype=dtype) if grad else None

    if impl in ("xtk", "eager"):
        backend = "auto" if impl == "xtk" else "eager"

        def fwd():
            return xtk.attention(q, k, v, is_causal=causal, backend=backend, **kw)
    elif impl == "sdpa":
        if kw.get("topk") is not None:
            return None, "SDPA has no top-k"

        def fwd():
            qq, kk, scale = _prep_qk(q, k, kw, n)
            m = _dense_bias(kw, h, n, causal, qq.dtype)
            return F.scaled_dot_product_attention(qq, kk, v, attn_mask=m, scale=scale)
    elif impl == "sdpa-nobias":
        if feature != "none":
            return None, "speed-of-light row: measured once, with no feature"

        def fwd():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    elif impl == "flex":
        if device != "cuda" and grad:
            return None, "flex_attention has no backward on CPU"
        fn, why = _flex_fn(kw, h, n, causal, device)
        if fn is None:
            return None, why

        def fwd():
            qq, kk, scale = _prep_qk(q, k, kw, n)
            return fn(qq, kk, v, scale)
    else:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")

    leaves = [t for t in (q, k, v) if t.requires_grad]
    bias = kw.get("bias")
    for attr in ("table", "slopes"):
        t = getattr(bias, attr, None) if bias is not None else None
        if t is not None and t.requires_grad:
            leaves.append(t)
    return timed_step(fwd, grad, leaves, go), ""


def _eager_too_big(shape, mode, dtype, device) -> Optional[str]:
    b, h, n, d = shape
    est = b * h * n * n * 4 * (6 if mode == "fwd+bwd" else 3)  # fp32 scores, bias, probabilities (+ grads)
    if device == "cpu" and est > CPU_EAGER_LIMIT_BYTES:
        return f"estimated {est / 2**30:.0f} GiB of (b,h,n,n) tensors > {CPU_EAGER_LIMIT_BYTES / 2**30:.0f} GiB: not run on CPU"
    return None


def _quick_cpu_flex_skip(impl, feature, causal, mode, device, full) -> Optional[str]:
    if impl != "flex" or device == "cuda" or full or mode != "fwd" or (feature in QUICK_CPU_FLEX and causal):
        return None
    return "quick CPU sweep: flex for ALiBi, causal (--full: every row)"


def run(device: str, full: bool, dtype, features=None, impls=None, modes=None, causals=(False, True), progress=None,
        shapes=None):
    """One ``Result`` per cell (progress: a callable advanced once per cell); ``shapes`` replaces the sweep."""
    results = []
    for shape in shapes or sweep(device, full):
        b, h, n, d = shape
        for feature in features or FEATURES:
            for causal in causals:
                for mode in modes or MODES:
                    for impl in impls or IMPLS:
                        if impl == "sdpa-nobias" and feature != "none":
                            continue  # one speed-of-light row per shape
                        params = dict(b=b, h=h, n=n, d=d, causal=causal, dtype=str(dtype).replace("torch.", ""))
                        r = Result("attention", feature, impl, mode, params,
                                   flops=flops(b, h, n, d, causal, mode))
                        too_big = _eager_too_big(shape, mode, dtype, device) if impl in ("eager", "sdpa") else None
                        unswept = _quick_cpu_flex_skip(impl, feature, causal, mode, device, full)
                        if too_big:
                            r.status, r.note = "OOM", too_big
                        elif unswept:
                            r.status = "skipped: " + unswept
                        else:
                            call, why = make_call(impl, feature, shape, causal, mode, dtype, device)
                            if call is None:
                                r.status = "skipped: " + why
                            else:
                                if impl == "flex":
                                    t0 = time.perf_counter()
                                    try:
                                        call()
                                        if device == "cuda":
                                            torch.cuda.synchronize()
                                        r.compile_s = time.perf_counter() - t0
                                    except Exception:
                                        pass
                                measure(r, lambda: call, device, quick=not full)
                        results.append(r)
                        if progress:
                            progress()
    return results


def count(device: str, full: bool, features=None, impls=None, modes=None, causals=(False, True), shapes=None) -> int:
    n = 0
    for feature in features or FEATURES:
        for impl in impls or IMPLS:
            if not (impl == "sdpa-nobias" and feature != "none"):
                n += 1
    return len(shapes or sweep(device, full)) * n * len(causals) * len(modes or MODES)
