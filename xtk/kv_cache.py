"""Caches that serving code owns: ``xtk.KVCache`` (contiguous, preallocated) and ``xtk.PagedKVCache``
(a pool of pages and a block table). Both hold the keys and values of every attention layer of a
model, a per-sequence length on the device (``seqlens``, int32, what ``xtk.attention_with_kvcache``
reads) and its mirror on the host (``lengths``), so that a step checks room and allocates pages
without reading the device. A decode step of an ``L``-layer model::

    cache = xtk.KVCache(layers=L, batch=b, kv_heads=hk, max_len=4096, dim_head=d, dtype=torch.bfloat16, device="cuda")
    for layer in range(L):        # inside the model: q (b, h, 1, d), the new k, v (b, hk, 1, d)
        out = cache.attend(layer, q, k, v, bias=xtk.bias.Alibi(slopes))
    cache.advance(1)              # every sequence now holds one more position

``attend`` writes the new keys/values at each sequence's length and attends the cached ones plus
the new (keys are cached raw: QK-norm and rotary apply in the attention, from positions). Nothing
is written by a step that would not fit: ``attend`` and ``advance`` raise first.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .ops import _check
from .ops.attention_kvcache import attention_with_kvcache

__all__ = ["KVCache", "PagedKVCache"]


def _sizes(**sizes) -> None:
    for name, value in sizes.items():
        _check.integer(name, value, minimum=1)


class _Lengths:
    """``seqlens`` ``(n,)`` int32 on the device and its host mirror ``lengths`` (python ints)."""

    def __init__(self, n: int, device):
        self.seqlens = torch.zeros(n, dtype=torch.int32, device=device)
        self.lengths = [0] * n

    def rows(self, rows) -> list:
        """``rows`` (None: all; else a sequence / 1-D int tensor of row ids) as a checked host list."""
        if rows is None:
            return list(range(len(self.lengths)))
        out = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        bad = [r for r in out if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < len(self.lengths)]
        if bad:
            raise ValueError(f"rows: expected sequence ids in [0, {len(self.lengths)}), got {bad}")
        if len(set(out)) != len(out):
            raise ValueError(f"rows: expected distinct sequence ids, got {out}")
        return out

    def grow(self, n: int, rows: list) -> None:
        for r in rows:
            self.lengths[r] += n
        if rows == list(range(len(self.lengths))):
            self.seqlens.add_(n)
        else:
            self.seqlens[torch.tensor(rows, device=self.seqlens.device)] += n

    def set(self, rows: list, value: int) -> None:
        for r in rows:
            self.lengths[r] = value
        self.seqlens[torch.tensor(rows, device=self.seqlens.device)] = value


class _Store:
    """What both caches share: ``k``/``v`` with layers first, the lengths (``_len``)."""

    k: torch.Tensor
    _len: _Lengths

    @property
    def seqlens(self) -> torch.Tensor:
        """``(n,)`` int32 on the cache's device: what each sequence (slot) holds."""
        return self._len.seqlens

    @property
    def lengths(self) -> list:
        """The same on the host (a copy)."""
        return list(self._len.lengths)

    def _check_layer(self, layer: int) -> None:
        _check.integer("layer", layer, minimum=0)
        if layer >= self.k.shape[0]:
            raise ValueError(f"layer: expected a layer in [0, {self.k.shape[0]}), got {layer}")


class KVCache(_Store):
    """A preallocated contiguous cache: ``k`` ``(layers, batch, kv_heads, max_len, dim_head)``, ``v``
    ``(..., dim_value)`` (default ``dim_head``) in ``dtype`` on ``device``; ``seqlens`` ``(batch,)``
    int32 on the device and ``lengths`` on the host: the positions each sequence holds (0 at first)."""

    def __init__(self, *, layers: int, batch: int, kv_heads: int, max_len: int, dim_head: int,
                 dim_value: Optional[int] = None, dtype: torch.dtype = torch.float32, device=None):
        dim_value = dim_head if dim_value is None else dim_value
        _sizes(layers=layers, batch=batch, kv_heads=kv_heads, max_len=max_len, dim_head=dim_head, dim_value=dim_value)
        self.k = torch.zeros(layers, batch, kv_heads, max_len, dim_head, dtype=dtype, device=device)
        self.v = torch.zeros(layers, batch, kv_heads, max_len, dim_value, dtype=dtype, device=device)
        self._len = _Lengths(batch, self.k.device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def _room(self, n: int, rows: list, what: str) -> None:
        full = [r for r in rows if self._len.lengths[r] + n > self.max_len]
        if full:
            raise ValueError(f"{what}: sequences {full} hold {[self._len.lengths[r] for r in full]} positions; "
                             f"{n} more exceed max_len = {self.max_len}; nothing was written")

    def attend(self, layer: int, q: torch.Tensor, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
               **kwargs) -> torch.Tensor:
        """Attention of layer ``layer``: q ``(batch, h, nq, d)``, the new k ``(batch, hk, nq, d)`` and v
        (or neither) written at each sequence's length first; ``kwargs`` as in
        ``xtk.attention_with_kvcache`` (bias, is_causal, qk_norm, rotary, ...). -> ``(batch, h, nq, dv)``.
        The lengths do not change: call ``advance(nq)`` after the model's last layer."""
        self._check_layer(layer)
        if k is not None:
            self._room(q.shape[2], list(range(self.k.shape[1])), "q")
        return attention_with_kvcache(q, self.k[layer], self.v[layer], k, v, cache_seqlens=self.seqlens, **kwargs)

    def advance(self, n: int, rows=None) -> None:
        """Every sequence (or those in ``rows``) now holds ``n`` more positions."""
        _check.integer("n", n, minimum=0)
        rows = self._len.rows(rows)
        self._room(n, rows, "n")
        self._len.grow(n, rows)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """k ``(batch, hk, n, d)`` and v into layer ``layer`` at positions ``[start, start + n)`` of every
        sequence (the models' path: all rows at one length). -> the views ``(k, v)`` of positions
        ``[0, start + n)``; the lengths do not change (``advance``)."""
        n = k.shape[-2]
        if start + n > self.max_len:
            raise ValueError(f"k: positions [{start}, {start + n}) exceed max_len = {self.max_len}; nothing was written")
        self.k[layer, :, :, start:start + n] = k
        self.v[layer, :, :, start:start + n] = v
        return self.k[layer, :, :, :start + n], self.v[layer, :, :, :start + n]

    def reset(self, rows=None) -> None:
        """Sequences ``rows`` (default all) start over empty (their slots are reused, not cleared)."""
        self._len.set(self._len.rows(rows), 0)


class PagedKVCache(_Store):
    """A paged cache: ``k`` ``(layers, num_pages, kv_heads, page_size, dim_head)``, ``v`` ``(...,
    dim_value)``; ``block_table`` ``(max_seqs, max_pages_per_seq)`` int32: the pages of each sequence
    slot in order (unused entries 0); ``seqlens``/``lengths`` per sequence slot. ``reserve`` gives a
    sequence the pages for its next positions (from a free list on the host), ``free`` returns them.
    ``page_size`` a multiple of 16; ``max_pages_per_seq`` default ``num_pages``."""

    def __init__(self, *, layers: int, num_pages: int, page_size: int, kv_heads: int, dim_head: int, max_seqs: int,
                 max_pages_per_seq: Optional[int] = None, dim_value: Optional[int] = None,
                 dtype: torch.dtype = torch.float32, device=None):
        dim_value = dim_head if dim_value is None else dim_value
        max_pages_per_seq = num_pages if max_pages_per_seq is None else max_pages_per_seq
        _sizes(layers=layers, num_pages=num_pages, page_size=page_size, kv_heads=kv_heads, dim_head=dim_head,
               max_seqs=max_seqs, max_pages_per_seq=max_pages_per_seq, dim_value=dim_value)
        if page_size % 16:
            raise ValueError(f"page_size: expected a multiple of 16, got {page_size}")
        self.k = torch.zeros(layers, num_pages, kv_heads, page_size, dim_head, dtype=dtype, device=device)
        self.v = torch.zeros(layers, num_pages, kv_heads, page_size, dim_value, dtype=dtype, device=device)
        self.block_table = torch.zeros(max_seqs, max_pages_per_seq, dtype=torch.int32, device=self.k.device)
        self._len = _Lengths(max_seqs, self.k.device)
        self._free = list(range(num_pages - 1, -1, -1))   # pop() hands out the lowest page first
        self._pages = [[] for _ in range(max_seqs)]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages(self, seq: int) -> list:
        """The pages of sequence slot ``seq``, in order."""
        return list(self._pages[self._len.rows([seq])[0]])

    def reserve(self, seqs: Sequence[int], n: int) -> None:
        """Pages for ``n`` more positions of each sequence slot in ``seqs``, all or nothing: a pool
        or a block-table row that cannot hold them raises with nothing allocated."""
        rows = self._len.rows(seqs)
        _check.integer("n", n, minimum=0)
        need = {r: -(-(self._len.lengths[r] + n) // self.page_size) - len(self._pages[r]) for r in rows}
        over = [r for r in rows if len(self._pages[r]) + need[r] > self.block_table.shape[1]]
        if over:
            raise ValueError(f"n: sequences {over} would need more than max_pages_per_seq = "
                             f"{self.block_table.shape[1]} pages; nothing was allocated")
        total = sum(max(0, x) for x in need.values())
        if total > len(self._free):
            raise ValueError(f"n: {total} more pages needed, {len(self._free)} free in the pool; nothing was allocated")
        for r in rows:
            for _ in range(max(0, need[r])):
                self._pages[r].append(self._free.pop())
            self._sync_row(r)

    def _sync_row(self, r: int) -> None:
        row = self._pages[r] + [0] * (self.block_table.shape[1] - len(self._pages[r]))
        self.block_table[r] = torch.tensor(row, dtype=torch.int32).to(self.block_table.device, non_blocking=True)

    def free(self, seqs: Sequence[int]) -> None:
        """Sequence slots ``seqs`` return their pages to the pool and start over empty."""
        rows = self._len.rows(seqs)
        for r in rows:
            self._free.extend(reversed(self._pages[r]))
            self._pages[r] = []
            self._sync_row(r)
        self._len.set(rows, 0)

    def attend(self, layer: int, q: torch.Tensor, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
               *, seqs, **kwargs) -> torch.Tensor:
        """Attention of layer ``layer`` for the sequence slots ``seqs`` (``(b,)``; q row ``i`` is slot
        ``seqs[i]``): q ``(b, h, nq, d)``, new k/v ``(b, hk, nq, d|dv)`` written first (``reserve(seqs,
        nq)`` before); ``kwargs`` as in ``xtk.attention_with_kvcache``. -> ``(b, h, nq, dv)``; the
        lengths do not change (``advance``)."""
        self._check_layer(layer)
        rows = self._len.rows(seqs)
        if k is not None:
            self._room(q.shape[2], rows, "q")
        idx = torch.tensor(rows, device=self.k.device)
        return attention_with_kvcache(q, self.k[layer], self.v[layer], k, v, cache_seqlens=self.seqlens[idx],
                                      block_table=self.block_table[idx], **kwargs)

    def _room(self, n: int, rows: list, what: str) -> None:
        short = [r for r in rows if self._len.lengths[r] + n > len(self._pages[r]) * self.page_size]
        if short:
            raise ValueError(f"{what}: sequences {short} have no pages reserved for {n} more positions "
                             f"(call reserve(seqs, {n}) first); nothing was written")

    def advance(self, n: int, seqs) -> None:
        """Sequence slots ``seqs`` now hold ``n`` more positions (within their reserved pages)."""
        _check.integer("n", n, minimum=0)
        rows = self._len.rows(seqs)
        self._room(n, rows, "n")
        self._len.grow(n, rows)
