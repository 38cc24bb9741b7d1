"""``KVCache``: the key/value cache of one ``AttentionLayers`` stack, and the one place that knows
its layout. Every wrapper (``TransformerWrapper``, ``ContinuousTransformerWrapper``, the
autoregressive wrappers, beam search) goes through its methods.

How to use it (this is what ``AutoregressiveWrapper.generate`` does)::

    logits, cache = net(x, return_intermediates=True)             # prompt: full forward
    x = torch.cat((x, next_token), dim=-1)
    logits, cache = net(x, return_intermediates=True, cache=cache)
    # `x` is the WHOLE sequence so far; only the positions from `cache.first_new_position(...)`
    # on (here the one new token) are embedded and run through the layers, each attending to
    # the cached keys/values: a new token costs O(n), not a full re-run. `logits` then cover
    # only those new tokens (shape (b, n_new, num_tokens)).

To keep the cache bounded (e.g. to ``max_seq_len - 1`` positions) call ``cache.trim(keep)`` and
pass only the last ``keep + 1`` tokens; to grow or reorder the batch (beam search) call
``cache.index(rows)``. ``LayerIntermediates`` (what the models return with
``return_intermediates=True``) is a ``KVCache``: as in x-transformers, the intermediates of one
call are the cache of the next.
"""
from __future__ import annotations

from copy import copy
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from ..kv_cache import KVCache as Store

__all__ = ["KVCache", "StoredKV", "StaticKV", "extend_kv", "trimmed_or_none"]


@dataclass(kw_only=True)
class KVCache:
    """The keys and values an ``AttentionLayers`` stack has computed so far, per attention layer.

    Layout (xtk's ``Attention`` returns the cached keys/values of a layer with the new positions
    appended, through ``extend_kv``: concatenated, or written in place into a preallocated store
    once ``preallocated`` has made one; the decoding loops do that after the prompt):

    ``attn_intermediates[l].cached_kv`` = ``(k, v)`` of attention layer ``l``, in layer order, its
    ``layer_type`` 'a' (self attention) or 'c' (cross attention):

    - self attention: ``k``, ``v`` of shape ``(b, kv_heads, kv_length, dim_head)``; keys before
      QK-norm and rotary (applied per call); no memory key/values, no Transformer-XL memories;
    - cross attention: ``(b, kv_heads, m, dim_head)`` for a context of ``m`` positions, computed
      by the first call and reused.

    ``cache_length`` (x-transformers' name): the positions the stack has seen, those dropped by
    ``trim`` included; ``kv_length``: the positions the self-attention layers hold now (equal
    until a trim). A preallocated or paged cache implements the same methods (``kv_length``,
    ``first_new_position``, ``layer_caches``, ``append``, ``trim``, ``index``, ``copy``): the
    wrappers and ``AttentionLayers`` call nothing else.
    """

    attn_intermediates: Optional[list] = None
    cache_length: int = 0

    def _self_attention_layers(self) -> list:
        """The entries of the self-attention layers that hold keys, in layer order."""
        return [inter for inter in self.attn_intermediates or []
                if inter.cached_kv is not None and inter.layer_type != "c"]

    @property
    def kv_length(self) -> int:
        """Positions each self-attention layer holds (dim -2 of its cached keys); without
        self-attention layers (a cross-attention-only stack) ``cache_length``."""
        held = self._self_attention_layers()
        return held[0].cached_kv[0].shape[-2] if held else self.cache_length

    @property
    def cached_length(self) -> int:
        """The old name of ``kv_length``, kept for callers."""
        return self.kv_length

    def first_new_position(self, n: int, prepend_len: int = 0, what: str = "tokens") -> int:
        """Where the new positions start in an input ``x`` of ``n`` positions that holds the whole
        sequence so far after ``prepend_len`` prepended embeddings (the cache holds those too):
        ``offset = kv_length - prepend_len``; ``x[:, offset:]`` is what a cached step still runs.
        ValueError (naming ``x``'s items as ``what``) unless ``0 <= offset < n``."""
        held = self.kv_length
        offset = held - prepend_len
        if not 0 <= offset < n:
            raise ValueError(f"x: with a cache of {held} positions expected more than {offset} {what}, got {n}")
        return offset

    def layer_caches(self) -> list:
        """One entry per attention layer, in layer order: what ``AttentionLayers`` hands each
        attention layer as its ``cache`` (an object with ``cached_kv``)."""
        return list(self.attn_intermediates or [])

    def append(self, layer_caches: list, num_new: int) -> "KVCache":
        """The cache after a step that ran ``num_new`` new positions: ``layer_caches[l]`` is
        attention layer ``l``'s entry from that step, its ``cached_kv`` holding the old and the new
        keys/values (xtk's ``Attention`` concatenates them). Returns a new cache of the same type
        (``cache_length`` grown by ``num_new``, its other fields unset); ``self`` is left as it was."""
        return type(self)(attn_intermediates=list(layer_caches), cache_length=self.cache_length + num_new)

    def trim(self, keep: int) -> bool:
        """Keep only the last ``keep`` positions of every self-attention layer (in place; the
        cross-attention keys stay). False, with nothing changed, when no layer holds
        self-attention keys: such a cache cannot continue a shorter window (drop it)."""
        layers = self._self_attention_layers()
        for inter in layers:
            inter.cached_kv = _map_kv(inter.cached_kv, lambda t: t[..., -keep:, :])
        return bool(layers)

    def index(self, rows: Tensor) -> None:
        """Select / repeat / reorder the batch rows of every cached key and value (self and cross
        attention), in place: row ``i`` becomes old row ``rows[i]`` (``rows``: ``(b_new,)`` int)."""
        for inter in self.attn_intermediates or []:
            if inter.cached_kv is not None:
                inter.cached_kv = _map_kv(inter.cached_kv, lambda t: t[rows])

    def is_preallocated(self) -> bool:
        """Whether the self-attention keys/values sit in preallocated stores (``StoredKV``)."""
        return any(isinstance(i.cached_kv, StoredKV) for i in self._self_attention_layers())

    def preallocated(self, capacity: int) -> "KVCache":
        """A copy whose self-attention keys/values sit in preallocated stores of ``capacity``
        positions (``StoredKV``), so that the next steps write their keys in place instead of
        concatenating (O(n) memory traffic over a generation instead of O(n^2)); the values are
        those of ``self``, which is left as it was."""
        out = copy(self)
        for inter in out._self_attention_layers():
            k, v = inter.cached_kv
            if k.shape[:3] == v.shape[:3]:   # not collaborative heads (one key head, kv_heads value heads)
                inter.cached_kv = StoredKV.holding(k, v, max(capacity, k.shape[-2]))
        return out

    def __copy__(self):
        """A copy whose per-layer entries are copies too, so that ``trim`` / ``index`` on one
        leave the other as it was (the tensors themselves are shared)."""
        out = replace(self)
        if self.attn_intermediates is not None:
            out.attn_intermediates = [copy(i) for i in self.attn_intermediates]
        return out


class StoredKV(tuple):
    """A self-attention layer's cached ``(k, v)``: views ``(b, hk, length, d|dv)`` of positions
    ``[0, length)`` of ``store``, a one-layer ``xtk.KVCache`` with room for more positions. A tuple,
    so that it reads as the plain ``(k, v)`` it holds."""

    def __new__(cls, store, length: int):
        self = super().__new__(cls, (store.k[0, :, :, :length], store.v[0, :, :, :length]))
        self.store, self.length = store, length
        return self

    @classmethod
    def holding(cls, k: Tensor, v: Tensor, capacity: int) -> "StoredKV":
        """A new store of ``capacity >= n`` positions holding k ``(b, hk, n, d)`` and v (copied)."""
        b, hk, n, d = k.shape
        store = Store(layers=1, batch=b, kv_heads=hk, max_len=capacity, dim_head=d, dim_value=v.shape[-1],
                      dtype=k.dtype, device=k.device)
        store.write(0, 0, k, v)
        store.advance(n)
        return cls(store, n)

    def can_extend(self, k: Tensor, v: Tensor) -> bool:
        """Whether k, v ``(b, hk, n, d|dv)`` can be written in place after this entry: it is the
        store's newest (no later step wrote after it, so a branch never overwrites another), there
        is room, the dtypes match, and no gradient would flow through the in-place write."""
        store = self.store
        return (store.lengths[0] == self.length and self.length + k.shape[-2] <= store.max_len
                and k.dtype == store.k.dtype and v.dtype == store.v.dtype and _no_grad_flow(k, v))


@dataclass(eq=False)
class StaticKV:
    """An attention layer's keys/values for a static decode step (``xtk.models.static_decode``):
    stores ``k`` ``(b, hk, capacity, d)`` and ``v`` ``(b, hk, capacity, dv)`` of fixed shape,
    ``seqlens`` ``(b,)`` int32 on the device: the positions each sequence holds (self attention:
    shared by every layer, advanced by the step only). ``Attention`` writes a step's key/value at
    ``seqlens[b]`` and attends through ``xtk.attention_with_kvcache`` with ``backend``; ``cross``:
    the context's keys/values of cross attention, read only. Nothing reads ``seqlens`` on the host."""

    k: Tensor
    v: Tensor
    seqlens: Tensor
    backend: str = "auto"
    cross: bool = False

    @classmethod
    def holding(cls, k: Tensor, v: Tensor, capacity: int, seqlens: Tensor, backend: str = "auto") -> "StaticKV":
        """New stores of ``capacity >= n`` positions holding k ``(b, hk, n, d)`` and v (copied) in
        their first ``n`` slots; ``seqlens`` should hold ``n`` for every sequence."""
        b, hk, n, _ = k.shape
        sk = k.new_zeros(b, hk, capacity, k.shape[-1])
        sv = v.new_zeros(b, hk, capacity, v.shape[-1])
        sk[:, :, :n], sv[:, :, :n] = k, v
        return cls(sk, sv, seqlens, backend)


def extend_kv(cached, k: Tensor, v: Tensor) -> tuple:
    """A self-attention layer's cached ``(k, v)`` followed by this step's k ``(b, hk, n, d)`` and v
    -> ``(k_all, v_all, entry to cache)``. Into the preallocated store in place when ``cached`` is a
    ``StoredKV`` that can take them; a ``StoredKV`` without room moves to a store twice as long;
    a plain tuple is concatenated (``torch.cat``)."""
    if isinstance(cached, StoredKV):
        n = k.shape[-2]
        if cached.can_extend(k, v):
            cached.store.write(0, cached.length, k, v)
            cached.store.advance(n)
            entry = StoredKV(cached.store, cached.length + n)
            return entry[0], entry[1], entry
        if k.dtype == cached[0].dtype and v.dtype == cached[1].dtype and _no_grad_flow(k, v):
            entry = StoredKV.holding(torch.cat((cached[0], k), -2), torch.cat((cached[1], v), -2),
                                     2 * (cached.length + n))
            return entry[0], entry[1], entry
    ck, cv = cached
    k_all, v_all = torch.cat((ck, k), dim=-2), torch.cat((cv, v), dim=-2)
    return k_all, v_all, (k_all, v_all)


def _no_grad_flow(k: Tensor, v: Tensor) -> bool:
    """Whether no gradient would flow through writing k, v into a store (an in-place write into a
    tensor autograd saved would fail in backward): grad mode off, or neither requires grad."""
    return not (torch.is_grad_enabled() and (k.requires_grad or v.requires_grad))


def _map_kv(cached, fn):
    """``(fn(k), fn(v))`` of a cached entry; a ``StoredKV`` stays one, in a new store of the same
    capacity (``trim`` / ``index`` never change a store another cache may still read).
    Entries whose keys and values have different head counts (collaborative heads) stay tuples."""
    if isinstance(cached, StoredKV):
        return StoredKV.holding(fn(cached[0]), fn(cached[1]), cached.store.max_len)
    return type(cached)(fn(t) for t in cached)


def trimmed_or_none(cache, keep: int, can_trim: bool) -> Optional[KVCache]:
    """``cache`` trimmed to its last ``keep`` positions, or None (the caller recomputes without a
    cache) when the network's positions do not allow a trimmed cache (``can_trim`` False: an
    absolute positional embedding), when ``cache`` is not an xtk ``KVCache`` (a duck-typed
    network's), or when it holds no self-attention keys."""
    if cache is not None and can_trim and isinstance(cache, KVCache) and cache.trim(keep):
        return cache
    return None
