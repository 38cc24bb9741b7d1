"""Decode: one attention step of one new query row per sequence over a KV cache of ``n`` positions
(``xtk.attention_with_kvcache``), with no bias, ALiBi, T5 or a DistanceTable.

* ``xtk``: a contiguous cache ``(b, hk, n, d)``; ``xtk-paged``: the same keys in shuffled pages of 64
  slots through a block table. Both attend all ``n`` cached keys (``cache_seqlens = n``, no new keys:
  the write of one position is not part of the step).
* ``sdpa``: ``F.scaled_dot_product_attention`` on the contiguous cache (``enable_gqa``) with the bias
  row ``(h, 1, n)`` built every step, as a user of SDPA would.
* ``flex``: ``flex_attention`` compiled, the bias as a ``score_mod``; CUDA only.

The query sits at position ``n`` (after the ``n`` cached keys, as ``attention_with_kvcache`` places
it when no new keys come with it).

Bandwidth: the bytes of K and V read once (``2 b hk n d`` elements), over the median step time. The
issue's target shape (H100, bf16): b 8, 32 query heads / 8 kv heads, d 128, n 32768.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import xtk
from xtk.bias import Alibi, DistanceTable, T5, alibi_slopes

from .bench_attention import _flex_fn
from .common import Result, measure, timed_step

IMPLS = ["xtk", "xtk-paged", "sdpa", "flex"]
CASES = ["none", "alibi", "t5", "dtable"]
PAGE = 64


def shapes(device: str, full: bool) -> list:
    """(b, h, hk, n, d) per row."""
    if device == "cuda":
        ns = (4096, 8192, 16384, 32768) if full else (4096, 32768)
        return [(8, 32, 8, n, 128) for n in ns]
    ns = (1024, 4096, 16384) if full else (2048,)
    return [(2, 8, 2, n, 64) for n in ns]


def _bias(case: str, h: int, n: int, device):
    g = torch.Generator().manual_seed(1)
    if case == "alibi":
        return Alibi(torch.tensor(alibi_slopes(h), device=device))
    if case == "t5":
        return T5((torch.randn(32, h, generator=g) * 0.1).to(device), num_buckets=32, max_distance=128, causal=True)
    if case == "dtable":
        return DistanceTable((torch.randn(2 * n + 1, h, generator=g) * 0.1).to(device))   # distances 0..n
    return None


def _paged(k_cache, v_cache, g):
    """The contiguous caches ``(b, hk, n, d)`` in shuffled pages: -> (k_pages, v_pages, block_table)."""
    b, hk, n, d = k_cache.shape
    per = -(-n // PAGE)
    order = torch.randperm(b * per, generator=g)
    pages = [torch.zeros(b * per, hk, PAGE, c.shape[-1], dtype=c.dtype, device=c.device) for c in (k_cache, v_cache)]
    for src, dst in zip((k_cache, v_cache), pages):
        padded = F.pad(src, (0, 0, 0, per * PAGE - n)).reshape(b, hk, per, PAGE, -1).permute(0, 2, 1, 3, 4)
        dst[order] = padded.reshape(b * per, hk, PAGE, -1)
    return pages[0], pages[1], order.reshape(b, per).to(device=k_cache.device, dtype=torch.int32)


def make_call(impl: str, case: str, shape, dtype, device):
    """-> (a zero-argument callable running one decode step, or None with the reason it cannot)."""
    b, h, hk, n, d = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, 1, d, generator=g).to(device, dtype)
    kc, vc = (torch.randn(b, hk, n, d, generator=g).to(device, dtype) for _ in range(2))
    bias = _bias(case, h, n, device)
    seqlens = torch.full((b,), n, dtype=torch.int32, device=device)
    if impl == "xtk":
        def fwd():
            return xtk.attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens, bias=bias)
    elif impl == "xtk-paged":
        kp, vp, table = _paged(kc, vc, g)

        def fwd():
            return xtk.attention_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=table, bias=bias)
    elif impl == "sdpa":
        def fwd():
            m = None if bias is None else bias.materialize(h, 1, n, n, 0).to(dtype)
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=m, enable_gqa=True)
    elif impl == "flex":
        if device != "cuda":
            return None, "flex_attention is measured on CUDA only"
        fn, why = _flex_fn({"bias": bias}, h, 1, False, device, nk=n, q_offset=n, enable_gqa=True)
        if fn is None:
            return None, why

        def fwd():
            return fn(q, kc, vc, None)
    else:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return timed_step(fwd, False), ""


def _impls(device: str, impls=None) -> list:
    return [i for i in (impls or IMPLS) if not (i == "flex" and device != "cuda")]


def run(device: str, full: bool, dtype, impls=None, cases=None, progress=None) -> list:
    results = []
    for shape in shapes(device, full):
        b, h, hk, n, d = shape
        for case in cases or CASES:
            for impl in _impls(device, impls):
                params = dict(b=b, h=h, hk=hk, n=n, d=d, dtype=str(dtype).replace("torch.", ""))
                r = Result("decode", case, impl, "fwd", params, bytes=2 * b * hk * n * d * dtype.itemsize)
                call, why = make_call(impl, case, shape, dtype, device)
                if call is None:
                    r.status = "skipped: " + why
                else:
                    measure(r, lambda: call, device, quick=not full)
                results.append(r)
                if progress:
                    progress()
    return results


def count(device: str, full: bool, impls=None, cases=None) -> int:
    return len(shapes(device, full)) * len(cases or CASES) * len(_impls(device, impls))
