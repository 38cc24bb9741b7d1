"""``xtk.attention_with_kvcache``: attention of 1-16 new query rows per sequence over a KV cache.

The serving entry point (issue 14): keys and values come from a contiguous cache ``(B, hk, n_max, d)``
or a paged one ``(num_pages, hk, page_size, d)`` addressed by a block table, with per-sequence
lengths. This module holds the semantics, every input check, the cache writes and the one dispatch
point: the split-KV decode kernel (``attention_kvcache_triton``, ``kernels/attention_decode.py``)
where it can run, else the reference path: per sequence, ``xtk.attention`` on the gathered keys (any
backend, every bias kind but Dense, top-k, QK-norm, rotary/xpos, memory key/values) -- the oracle of
the kernel's tests.

Host reads (what is checked when). The kernel's path reads no device value on the host, so that a
decode step can be captured in a CUDA graph:
- Always (host metadata only): every argument's type, shape, dtype and device (``cache_seqlens``,
  ``block_table``, ``cache_batch_idx``: int32 of the right shape on q's device; an int
  ``cache_seqlens`` >= k_prefix), the page size, the head counts, the bias's shape and device,
  topk / QK-norm / rotary / scale. The backend choice (``_pick``) rests on these alone.
- Only when the reference path is chosen (it needs the lengths on the host anyway) or when the
  environment sets ``XTK_DEBUG_CHECKS=1`` (``debug_checks``): the values, read once per call
  (``_read_values``): each length >= k_prefix and, with the new keys, within the cache's capacity
  (its block_table row when paged); the pages a sequence reads or writes inside the page pool;
  ``cache_batch_idx`` rows inside the cache and distinct when writing; a DistanceTable covering
  every distance of every sequence. A failing call raises before anything is written.
- Otherwise these values are trusted, as flash-attention's ``flash_attn_with_kvcache`` trusts them:
  a length past the capacity, a page outside the pool or a DistanceTable too short is undefined
  behaviour (out-of-bounds reads and writes), not an error.
The new keys/values are written by device-side indexing (``_write_new``: slots ``cache_seqlens[b]
+ i`` as a tensor, page and offset through ``block_table`` on the device), on both paths.

Positions: the first ``k_prefix`` cached keys of every sequence are memory key/values (no
position); cached key ``j >= k_prefix`` sits at ``j - k_prefix``; query ``i`` of sequence ``b`` sits
at ``cache_seqlens[b] - k_prefix + i``. With new ``k``/``v`` they are written at cache slots
``cache_seqlens[b] + i`` first (in place, raw keys: QK-norm and rotary are applied when attending)
and query ``i`` attends, under ``is_causal``, the cached keys and the new ones up to its own
position; without them it attends all ``cache_seqlens[b]`` cached keys.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .. import backends
from ..bias import Dense
from . import _check
from ..reference import attention as reference
from .attention import _validate_bias, _validate_qk_norm, _validate_rotary, attention, check_gqa_order

MAX_QUERY_ROWS = 16


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                           cache_batch_idx=None, is_causal=True, scale=None, bias=None, topk=None, qk_norm=None,
                           rotary=None, k_prefix=0, num_splits=0, return_lse=False, gqa_order="interleave",
                           backend="auto"):
    """q ``(b, h, nq, d)`` with ``1 <= nq <= 16``; k_cache ``(B, hk, n_max, d)`` and v_cache ``(B, hk,
    n_max, dv)``, or paged ``(num_pages, hk, page_size, d|dv)`` with ``block_table`` ``(b, max_pages)``
    int32 (page size a multiple of 16); new ``k`` ``(b, hk, nq, d)``, ``v`` ``(b, hk, nq, dv)`` or
    neither; ``cache_seqlens`` ``(b,)`` int32 (or an int for all); ``cache_batch_idx`` ``(b,)`` int32:
    the contiguous cache row of each sequence (default ``b``). -> ``(b, h, nq, dv)`` in q's dtype, and
    with ``return_lse`` also ``(b, h, nq)``: the natural log of each row's softmax normalizer
    ``sum_j exp(s_ij)`` over its kept logits (scaled, biased, masked, top-k), -inf for a row with no
    key, in ``promote(q.dtype, float32)`` (the reference path: ``xtk.reference.attention.log_sum_exp``).
    ``bias``, ``topk``, ``qk_norm``, ``rotary``, ``scale``, ``gqa_order`` as in ``xtk.attention`` (GQA
    follows from the head counts). ``num_splits``: the decode kernel's split-KV count (0: picked
    from the sizes, ``kernels/attention_decode_op.pick_splits``). ``backend``: 'triton' (the split-KV
    decode kernel; raises with its reasons where it cannot run), 'auto' (the kernel where it can,
    else the reference path; ``explain`` says why), or any ``xtk.attention`` backend, which runs
    the reference path on it. A call that no path can run raises and leaves the cache as it was;
    so does one that would overflow it, where its lengths are read (the reference path, or
    ``XTK_DEBUG_CHECKS=1``: the module docstring says what is checked when)."""
    inputs = kvcache_inputs(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
                            cache_batch_idx=cache_batch_idx, is_causal=is_causal, scale=scale, bias=bias, topk=topk,
                            qk_norm=qk_norm, rotary=rotary, k_prefix=k_prefix, num_splits=num_splits,
                            return_lse=return_lse, gqa_order=gqa_order, backend=backend)
    chosen = _pick(inputs)
    if chosen is REFERENCE or debug_checks():
        inputs = dataclasses.replace(inputs, host=_read_values(inputs))
    if k is not None:
        _write_new(inputs, k, v)
    out, lse = chosen.run(inputs)
    return (out, lse) if return_lse else out


def debug_checks() -> bool:
    """``XTK_DEBUG_CHECKS=1`` in the environment: the value checks (host reads) run on every path."""
    return os.environ.get("XTK_DEBUG_CHECKS", "") == "1"


def kvcache_inputs(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None, cache_batch_idx=None,
                   is_causal=True, scale=None, bias=None, topk=None, qk_norm=None, rotary=None, k_prefix=0,
                   num_splits=0, return_lse=False, gqa_order="interleave", backend="auto") -> "KVCacheInputs":
    """``attention_with_kvcache``'s arguments checked on their host metadata (no device value read,
    nothing written): the ``KVCacheInputs`` its backends run and ``explain`` answers on."""
    layout = _check_inputs(q, k_cache, v_cache, k, v, block_table, cache_batch_idx, bias, k_prefix, num_splits,
                           gqa_order)
    _check_seqlens(cache_seqlens, q, k_prefix)
    _check_features(q, k_cache, bias, topk, qk_norm, rotary, scale, k_prefix)
    return KVCacheInputs(q, k_cache, v_cache, k is not None, _seqlens_tensor(cache_seqlens, q), cache_seqlens, None,
                         layout, block_table, cache_batch_idx, bool(is_causal), scale, bias, topk, qk_norm, rotary,
                         k_prefix, num_splits, gqa_order, backend, bool(return_lse))


@dataclass(frozen=True, eq=False)
class HostValues:
    """The device values of one call read on the host (``_read_values``), checked: ``seqlens`` the
    lengths, ``rows`` the contiguous cache row of each sequence | ``table`` the pages of each."""

    seqlens: list
    rows: Optional[list]
    table: Optional[list]


@dataclass(frozen=True, eq=False)
class KVCacheInputs:
    """Checked arguments of one ``attention_with_kvcache`` call, for its backends. ``seqlens``: the
    device int32 ``(b,)`` lengths (the kernel reads these); ``cache_seqlens``: the argument as given
    (a tensor or an int); ``host``: the values read on the host (``HostValues``) where the call
    read them (the reference path, ``XTK_DEBUG_CHECKS=1``), else None; ``writes``: new k/v are
    written after the cached keys."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    writes: bool
    seqlens: torch.Tensor
    cache_seqlens: Any
    host: Optional[HostValues]
    layout: Any
    block_table: Optional[torch.Tensor]
    cache_batch_idx: Optional[torch.Tensor]
    is_causal: bool
    scale: Optional[float]
    bias: Any
    topk: Optional[int]
    qk_norm: Any
    rotary: Any
    k_prefix: int
    num_splits: int
    gqa_order: str
    backend: str
    return_lse: bool


def _reference_run(inputs: KVCacheInputs) -> tuple:
    """The reference semantics: per sequence, ``xtk.attention`` on the gathered keys (host lengths,
    read here unless the call read them); -> (out, lse | None): with ``return_lse``,
    ``reference.log_sum_exp`` of each sequence too."""
    q, nq = inputs.q, inputs.q.shape[2]
    host = inputs.host if inputs.host is not None else _read_values(inputs)
    outs, lses = [], []
    for b, start in enumerate(host.seqlens):
        nk = start + (nq if inputs.writes else 0)
        kb, vb = (_gather(c, inputs.layout, host, b, nk) for c in (inputs.k_cache, inputs.v_cache))
        kw = dict(is_causal=inputs.is_causal, scale=inputs.scale, bias=inputs.bias, topk=inputs.topk,
                  qk_norm=inputs.qk_norm, rotary=inputs.rotary, q_offset=start - inputs.k_prefix,
                  k_prefix=inputs.k_prefix, gqa_order=inputs.gqa_order)
        outs.append(attention(q[b:b + 1], kb, vb, enable_gqa=kb.shape[1] != q.shape[1], backend=inputs.backend, **kw))
        if inputs.return_lse:
            lses.append(reference.log_sum_exp(q[b:b + 1], kb, **kw))
    if not outs:
        return q.new_zeros(0, q.shape[1], nq, inputs.v_cache.shape[-1]), _empty_lse(q) if inputs.return_lse else None
    return torch.cat(outs, 0), torch.cat(lses, 0) if inputs.return_lse else None


def _empty_lse(q):
    return q.new_zeros(0, q.shape[1], q.shape[2], dtype=torch.promote_types(q.dtype, torch.float32))


REFERENCE = backends.Backend("reference", "attention_with_kvcache", lambda inputs, forced: [], _reference_run)


def _pick(inputs: KVCacheInputs) -> backends.Backend:
    """The decode kernel (``backends``' 'triton' of this op) when forced or, under 'auto', when it
    can run these inputs; else the reference path on the requested ``xtk.attention`` backend."""
    want = backends.requested(inputs.backend)
    if want in ("triton", "auto"):
        kernel = backends.load("attention_with_kvcache", "triton")
        why = [kernel] if isinstance(kernel, str) else kernel.reasons(inputs, want == "triton")
        if not why:
            return kernel
        if want == "triton":
            raise RuntimeError("attention_with_kvcache: backend 'triton' was requested but cannot run these inputs: "
                               + "; ".join(why))
    return REFERENCE


def explain(inputs: KVCacheInputs) -> list:
    """Each backend of ``attention_with_kvcache`` with its reasons on ``inputs`` (``kvcache_inputs``),
    in auto's order: ``[("triton", [...]), ("reference", [])]``."""
    return backends.explain("attention_with_kvcache", inputs)


def _seqlens_tensor(cache_seqlens, q) -> torch.Tensor:
    """``cache_seqlens`` as the kernel reads it: an int32 ``(b,)`` tensor on q's device (an int is broadcast)."""
    if isinstance(cache_seqlens, torch.Tensor):
        return cache_seqlens
    return torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)


def _check_features(q, k_cache, bias, topk, qk_norm, rotary, scale, k_prefix) -> None:
    """bias / topk / qk_norm / rotary / scale checked as ``xtk.attention`` checks them, on host
    metadata: the bias on the smallest call (the memory keys and the new rows); its coverage of each
    sequence's own distances is a value check (``_read_values``)."""
    b, h, nq, d = q.shape
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if topk is not None:
        _check.integer("topk", topk, minimum=1)
    _validate_qk_norm(qk_norm, scale, h, k_cache.shape[1], d)
    _validate_rotary(rotary, d)
    _validate_bias(bias, q, 1, h, nq, k_prefix + nq, 0, k_prefix)


class _Layout:
    """Where sequence ``b``'s cached keys live, in sizes: a contiguous cache (its rows named by
    ``cache_batch_idx``) or a paged one (``page`` slots each, ``num_pages`` in the pool, the pages of
    a sequence named by its ``block_table`` row); ``capacity`` slots per sequence."""

    def __init__(self, paged: bool, page: int, capacity: int, num_pages: int = 0):
        self.paged, self.page, self.capacity, self.num_pages = paged, page, capacity, num_pages

    def pages(self, table_row: list, n: int) -> list:
        """The pages of a block-table row that hold a sequence's first ``n`` slots."""
        return table_row[:-(-n // self.page)] if n else []


def _check_inputs(q, k_cache, v_cache, k, v, block_table, cache_batch_idx, bias, k_prefix, num_splits,
                  gqa_order) -> _Layout:
    """Every argument but cache_seqlens checked (the argument named, what was expected, what came)."""
    _check.tensor("q", q, ndim=4)
    _check.floating("q", q)
    b, h, nq, d = q.shape
    if not 1 <= nq <= MAX_QUERY_ROWS:
        raise ValueError(f"q: expected 1 to {MAX_QUERY_ROWS} query rows per sequence (decode), got {nq}; "
                         f"longer prompts go through xtk.attention")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check.tensor(name, t, ndim=4)
        _check.same(name, t, "q", q)
    hk = k_cache.shape[1]
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache: expected head dim {d} (q's), got shape {tuple(k_cache.shape)}")
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(f"v_cache: expected its first three dims {tuple(k_cache.shape[:3])} (k_cache's), "
                         f"got shape {tuple(v_cache.shape)}")
    if h % hk:
        raise ValueError(f"k_cache: query heads ({h}) must be divisible by its kv heads, got {hk}")
    _check_new_kv(k, v, b, hk, nq, d, v_cache.shape[3], q)
    if bias is not None and isinstance(bias, Dense):
        raise NotImplementedError("bias: a Dense bias is not supported by attention_with_kvcache: its key dim "
                                  "would be each sequence's own key count (cache_seqlens[b] + new keys), which "
                                  "differs per sequence and changes every step, so no (b, h, nq, nk) shape defines "
                                  "it; position biases (Alibi, T5, DistanceTable) are supported")
    _check.integer("k_prefix", k_prefix, minimum=0)
    _check.integer("num_splits", num_splits, minimum=0)
    check_gqa_order(gqa_order)
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx: not used with a paged cache (block_table names each sequence's pages)")
        return _paged_layout(block_table, k_cache, b, q)
    return _contiguous_layout(cache_batch_idx, k_cache, b, q)


def _check_new_kv(k, v, b, hk, nq, d, dv, q) -> None:
    if (k is None) != (v is None):
        raise ValueError(f"k, v: give both new keys and values or neither, got k {'None' if k is None else 'a tensor'} "
                         f"and v {'None' if v is None else 'a tensor'}")
    if k is None:
        return
    for name, t, want in (("k", k, (b, hk, nq, d)), ("v", v, (b, hk, nq, dv))):
        _check.tensor(name, t, ndim=4)
        _check.same(name, t, "q", q)
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: expected shape {want} (batch, kv heads, query rows, head dim), got {tuple(t.shape)}")


def _paged_layout(block_table, k_cache, b, q) -> _Layout:
    num_pages, page = k_cache.shape[0], k_cache.shape[2]
    if page % 16:
        raise ValueError(f"k_cache: expected a page size (dim 2 of a paged cache) that is a multiple of 16, got {page}")
    _check.int32_tensor("block_table", block_table, (b, None), q.device)
    return _Layout(True, page, page * block_table.shape[1], num_pages)


def _contiguous_layout(cache_batch_idx, k_cache, b, q) -> _Layout:
    if cache_batch_idx is not None:
        _check.int32_tensor("cache_batch_idx", cache_batch_idx, (b,), q.device)
    return _Layout(False, 0, k_cache.shape[2])


def _check_seqlens(cache_seqlens, q, k_prefix: int) -> None:
    """``cache_seqlens``: an int >= k_prefix, or an int32 ``(b,)`` tensor on q's device (not read)."""
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if cache_seqlens < k_prefix:
            raise ValueError(f"cache_seqlens: sequence 0 holds {cache_seqlens} keys, fewer than the k_prefix = "
                             f"{k_prefix} memory key/values every sequence starts with")
        return
    _check.int32_tensor("cache_seqlens", cache_seqlens, (q.shape[0],), q.device)


def _read_values(inputs: KVCacheInputs) -> HostValues:
    """The call's device values read on the host (one synchronisation) and checked: the rows, the
    lengths against the cache (and its pages), the bias's coverage of every sequence."""
    q, layout, b = inputs.q, inputs.layout, inputs.q.shape[0]
    rows = table = None
    if layout.paged:
        table = inputs.block_table.tolist()
    else:
        rows = list(range(b)) if inputs.cache_batch_idx is None else inputs.cache_batch_idx.tolist()
        _check_rows(rows, inputs.k_cache.shape[0], inputs.writes)
    given = inputs.cache_seqlens
    seqlens = [given] * b if isinstance(given, int) else given.tolist()
    _check_lengths(seqlens, q.shape[2] if inputs.writes else 0, inputs.k_prefix, layout, table)
    h, nq = q.shape[1], q.shape[2]
    for s in seqlens:
        _validate_bias(inputs.bias, q, 1, h, nq, s + (nq if inputs.writes else 0), s - inputs.k_prefix,
                       inputs.k_prefix)
    return HostValues(seqlens, rows, table)


def _check_rows(rows: list, n_rows: int, writes: bool) -> None:
    bad = [r for r in rows if not 0 <= r < n_rows]
    if bad:
        raise ValueError(f"cache_batch_idx: expected rows in [0, {n_rows}) of k_cache, got {bad}")
    if writes and len(set(rows)) != len(rows):
        raise ValueError(f"cache_batch_idx: two sequences would write the same cache row, got {rows}")


def _check_lengths(seqlens: list, new: int, k_prefix: int, layout: _Layout, table: Optional[list]) -> None:
    """Every sequence's length against the memory keys, the cache's capacity and its pages."""
    for i, s in enumerate(seqlens):
        if s < k_prefix:
            raise ValueError(f"cache_seqlens: sequence {i} holds {s} keys, fewer than the k_prefix = {k_prefix} "
                             f"memory key/values every sequence starts with")
        if s + new > layout.capacity:
            what = f"{layout.capacity} slots" + (" (its block_table row)" if layout.paged else "")
            raise ValueError(f"cache_seqlens: sequence {i} would hold {s + new} keys ({s} cached + {new} new), more "
                             f"than the cache's {what}; nothing was written")
        bad = [p for p in layout.pages(table[i], s + new) if not 0 <= p < layout.num_pages] if layout.paged else []
        if bad:
            raise ValueError(f"block_table: sequence {i} names pages {bad} outside the page pool [0, {layout.num_pages})")


def _write_new(inputs: KVCacheInputs, k, v) -> None:
    """The new keys/values ``(b, hk, nq, d|dv)`` into the cache in place, sequence ``b``'s at slots
    ``seqlens[b] + i``: every index computed on the device from the lengths (and the block table or
    cache rows), one ``index_put_`` per cache; no host read."""
    b, hk, nq = k.shape[:3]
    dev, layout = inputs.k_cache.device, inputs.layout
    slots = inputs.seqlens.long()[:, None] + torch.arange(nq, device=dev)  # (b, nq)
    heads = torch.arange(hk, device=dev)[None, None, :]
    if layout.paged:
        pages = torch.gather(inputs.block_table.long(), 1, slots // layout.page)
        index = (pages[:, :, None], heads, (slots % layout.page)[:, :, None])
    else:
        rows = (torch.arange(b, device=dev) if inputs.cache_batch_idx is None else inputs.cache_batch_idx.long())
        index = (rows[:, None, None], heads, slots[:, :, None])
    inputs.k_cache.index_put_(index, k.transpose(1, 2))  # indexed (b, nq, hk) x d
    inputs.v_cache.index_put_(index, v.transpose(1, 2))


def _gather(cache, layout: _Layout, host: HostValues, b: int, n: int) -> torch.Tensor:
    """Sequence ``b``'s first ``n`` cached entries as ``(1, hk, n, d)`` (a view for a contiguous cache)."""
    if not layout.paged:
        return cache[host.rows[b], :, :n][None]
    pages = layout.pages(host.table[b], n)
    if not pages:
        return cache.new_zeros(1, cache.shape[1], 0, cache.shape[3])
    held = cache[torch.tensor(pages, device=cache.device)]  # (pages, hk, page, d)
    return held.transpose(0, 1).reshape(cache.shape[1], -1, cache.shape[3])[None, :, :n]
